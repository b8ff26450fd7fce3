"""DP training step of the device model: one DP-SGD step (Opacus) against one plain step on the
same fixed batch, plus the parts that explain the gap.

Arms (each a model + optimizer that takes one optimizer step on the batch):
- plain: nn.GRU model, Adam: what a device runs with dp=off;
- dp-hooks: the DP model (ModelConfig.dp, shared/model.HoistedGRU) under Opacus' hooks: what
  `train_local` runs;
- dp-ghost, dp-functorch: the other grad_sample_modes `train_local` accepts;
- loopgru-plain: the DP model *without* Opacus: splits the DP cost into "the GRU written as a
  Python loop over time steps" and "per-sample gradients, clipping and noise";
- dp-hooks-dpgru: opacus.layers.DPGRU (what devices ran before HoistedGRU) under the hooks,
  for comparison;
- with --kinds gru,transformer the same arms for the causal-Transformer model (built from
  nn.Linear layers, so no recurrent Python loop).
The Opacus set-up mirrors client/dp_training._dp_sgd (make_private with our own sampling, mean
loss reduction, expected batch = the batch here). Steps of all arms are interleaved one by one
(A B C A B C ...), so load changes hit every arm alike; the median step is reported.

`round` additionally times whole `train_local` rounds (DP hooks vs plain, same data): that
includes make_private and Poisson sampling, i.e. what a simulated device pays per round.
"""

from __future__ import annotations

import copy
import functools
import time
import warnings
from dataclasses import dataclass

import torch
from fedinterest.simulations.bench.common import BenchResult, median, verdict

TARGET = 2.0


@dataclass
class StepArm:
    name: str
    kind: str  # gru | transformer
    mode: str | None  # None = no DP; else an Opacus grad_sample_mode
    dp_model: bool  # ModelConfig.dp=True: the GRU is shared/model.HoistedGRU
    opacus_dpgru: bool = False  # the GRU is swapped for opacus.layers.DPGRU (before 2026-11-28)


ARMS = {  # name -> (grad_sample_mode, dp model, opacus DPGRU)
    "plain": (None, False, False),
    "dp-hooks": ("hooks", True, False),
    "dp-ghost": ("ghost", True, False),
    "dp-functorch": ("functorch", True, False),
    "loopgru-plain": (None, True, False),
    "dp-hooks-dpgru": ("hooks", True, True),
}
TRANSFORMER_ARMS = ("plain", "dp-hooks", "dp-ghost", "dp-functorch")


def _opacus_dpgru(gru: torch.nn.Module) -> torch.nn.Module:
    """opacus.layers.DPGRU holding the same weights as the model's GRU."""
    from opacus.layers import DPGRU

    dpgru = DPGRU(gru.hidden_size, gru.hidden_size, num_layers=gru.num_layers,
                  batch_first=True)
    dpgru.load_state_dict(gru.state_dict())
    return dpgru


def _setup(n_items: int, cfg, kind: str, batch_size: int, seed: int):
    """(model config, global weights, item features, topics, batch, dataset) for one device."""
    from fedinterest.shared.fed_model import catalog_inputs, federated_model_config
    from fedinterest.shared.model import build_model, get_weights
    from fedinterest.shared.sequences import SegmentDataset, collate
    from fedinterest.simulations.bench.data import random_catalog, random_history

    catalog = random_catalog(n_items, seed=seed)
    run_cfg = cfg.replace(model="gru-text" if kind == "gru" else "transformer-text")
    mcfg = federated_model_config(run_cfg, catalog)
    feats, topics, _ = catalog_inputs(catalog)
    torch.manual_seed(seed)
    weights = get_weights(build_model(mcfg))
    items, ts, tv = random_history(n_items, batch_size * cfg.segment_len, seed=seed)
    data = SegmentDataset.from_events(items, ts, tv, n_items, cfg.segment_len, cfg.n_negatives,
                                      mcfg.text_dim, neg_probs=_neg_probs(mcfg, catalog),
                                      seed=seed)
    batch = collate([data[i] for i in range(batch_size)])
    return run_cfg, mcfg, weights, feats, topics, batch, data


def _neg_probs(mcfg, catalog):
    """The negative-sampling weights a device uses with this model config (as Device.train)."""
    if mcfg.neg_sampling != "pop":
        return None
    from fedinterest.shared.fed_model import negative_probs

    return negative_probs(catalog)


class Stepper:
    """One arm: a model and optimizer that take optimizer steps on a fixed batch."""

    def __init__(self, arm: StepArm, mcfg, weights, feats, topics, data, cfg, seed: int):
        from fedinterest.client.dp_training import SegmentTuples, build_local_model

        self.arm = arm
        torch.manual_seed(seed)
        self.model = build_local_model(mcfg, weights, feats, topics, data.neg_probs,
                                       dp=arm.dp_model).train()
        if arm.opacus_dpgru:
            self.model.encoder.gru = _opacus_dpgru(self.model.encoder.gru)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=cfg.lr)
        self.module = self.model
        self.phases: list[tuple[float, float, float]] = []
        self.cpu: list[float] = []  # process CPU seconds of each step
        if arm.mode is not None:
            from opacus import PrivacyEngine

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Secure RNG turned off")
                engine = PrivacyEngine(accountant="rdp")
            loader = torch.utils.data.DataLoader(SegmentTuples(data), batch_size=8)
            private = engine.make_private(
                module=self.model, optimizer=self.opt, data_loader=loader,
                noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                loss_reduction="mean", poisson_sampling=False,
                noise_generator=torch.Generator().manual_seed(seed), grad_sample_mode=arm.mode)
            self.module, self.opt = private[0], private[1]
            self.module.forbid_grad_accumulation()

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimizer step; returns its seconds and keeps (forward, backward, optimizer)
        seconds in `phases` (backward includes Opacus' per-sample gradients; the optimizer
        step includes DP clipping and noise)."""
        start, start_cpu = time.perf_counter(), time.process_time()
        self.opt.zero_grad(set_to_none=True)
        per_example, _ = self.model.example_losses(batch)
        t_fwd = time.perf_counter()
        if self.arm.mode is not None:
            self.opt.expected_batch_size = len(per_example)
        if self.arm.mode == "ghost":
            from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

            DPTensorFastGradientClipping(self.module, self.opt, per_example, "mean").backward()
        else:
            per_example.mean().backward()
        t_bwd = time.perf_counter()
        self.opt.step()
        end = time.perf_counter()
        self.phases.append((t_fwd - start, t_bwd - t_fwd, end - t_bwd))
        self.cpu.append(time.process_time() - start_cpu)
        return end - start


def step_times(arms: list[StepArm], steps: int, warmup: int, n_items: int, cfg,
               batch_size: int, seed: int = 0
               ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, str],
                          dict[str, dict]]:
    """Wall seconds and process CPU seconds of each step of each arm, steps interleaved
    across arms; the arms that raised (arm -> error), which are left out; median wall seconds
    per phase of each arm."""
    setups = {kind: _setup(n_items, cfg, kind, batch_size, seed)
              for kind in sorted({a.kind for a in arms})}
    steppers = []
    for arm in arms:
        run_cfg, mcfg, weights, feats, topics, batch, data = setups[arm.kind]
        steppers.append((Stepper(arm, mcfg, weights, feats, topics, data, run_cfg, seed),
                         batch))
    times: dict[str, list[float]] = {f"{a.kind}/{a.name}": [] for a in arms}
    failed: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for i in range(warmup + steps):
            for (stepper, batch), arm in zip(steppers, arms):
                key = f"{arm.kind}/{arm.name}"
                if key in failed:
                    continue
                try:
                    t = stepper.step(batch)
                except RuntimeError as e:  # an Opacus mode that cannot handle this model
                    failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    times.pop(key)
                    continue
                if i >= warmup:
                    times[key].append(t)
                else:
                    stepper.phases.clear()
                    stepper.cpu.clear()
    kept = [(stepper, f"{arm.kind}/{arm.name}") for (stepper, _), arm in zip(steppers, arms)
            if f"{arm.kind}/{arm.name}" in times]
    phases = {key: {name: median([p[j] for p in stepper.phases])
                    for j, name in enumerate(("forward", "backward", "optimizer"))}
              for stepper, key in kept}
    return times, {key: stepper.cpu for stepper, key in kept}, failed, phases


def round_times(reps: int, n_items: int, cfg, batch_size: int, segments: int,
                seed: int = 0) -> dict[str, list[float]]:
    """Seconds of whole `train_local` rounds, DP (hooks) and plain alternated, same data."""
    from fedinterest.client.dp_training import dp_steps, sample_rate, train_local
    from fedinterest.shared.privacy import EventLedger
    from fedinterest.shared.sequences import SegmentDataset
    from fedinterest.simulations.bench.data import random_history

    run_cfg, mcfg, weights, feats, topics, _, setup_data = _setup(n_items, cfg, "gru",
                                                                  batch_size, seed)
    items, ts, tv = random_history(n_items, segments * cfg.segment_len, seed=seed + 1)
    data = SegmentDataset.from_events(items, ts, tv, n_items, cfg.segment_len, cfg.n_negatives,
                                      mcfg.text_dim, neg_probs=setup_data.neg_probs, seed=seed)
    # the DP round on plain training's schedule (one pass at batch B), for a like comparison
    dp_cfg = run_cfg.replace(dp="event", device_epsilon=1e6, batch_size=batch_size,
                             dp_sample_rate=sample_rate(len(data), batch_size),
                             dp_steps=dp_steps(run_cfg.local_epochs, len(data), batch_size))
    plain_cfg = run_cfg.replace(dp="off", batch_size=batch_size)
    times: dict[str, list[float]] = {"dp-hooks": [], "plain": []}
    cpu: dict[str, list[float]] = {"dp-hooks": [], "plain": []}
    steps: dict[str, int] = {}
    for rep in range(reps):
        for name, c in (("dp-hooks", dp_cfg), ("plain", plain_cfg)):
            ledger = EventLedger(delta=c.delta) if c.event_dp else None
            start, start_cpu = time.perf_counter(), time.process_time()
            res = train_local(mcfg, weights, copy.copy(data), feats, topics, c, ledger, rep + 1,
                              seed=seed + rep)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            steps[name] = res.steps
    return {"seconds": times, "cpu_seconds": cpu, "steps": steps, "segments": len(data)}


def memoised_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """A proposal, measured here and not used by the devices: the same epsilon as
    `EventLedger.epsilon()` (Opacus' RDP accountant over the whole history), with the RDP of
    one step memoised per (noise multiplier, sample rate). RDP composes additively and
    Opacus' compute_rdp(q, sigma, steps) is steps * compute_rdp(q, sigma, 1), so the result
    is the same sum, computed once per distinct (sigma, q) instead of once per history entry
    and call."""
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    alphas = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(steps * np.asarray(_rdp_one_step(nm, q)) for nm, q, steps in history)
    eps, _ = analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    return tuple(analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier,
                                      steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def accountant_times(noise_multiplier: float, sample_rate: float, steps: int,
                     rounds_joined: tuple[int, ...] = (1, 5, 20), delta: float = 1e-5
                     ) -> dict:
    """Seconds of one `EventLedger.epsilon()` after a device joined n rounds (train_local
    calls it twice a round: the budget check and the ledger record), against the memoised
    proposal; and the largest difference between their epsilons."""
    from fedinterest.shared.privacy import EventLedger

    out = {}
    for n in rounds_joined:
        ledger = EventLedger(delta=delta, history=[(noise_multiplier, sample_rate, steps)] * n)
        start, start_cpu = time.perf_counter(), time.process_time()
        eps = ledger.epsilon()
        today = time.perf_counter() - start
        today_cpu = time.process_time() - start_cpu
        _rdp_one_step.cache_clear()
        start = time.perf_counter()
        memo_first = memoised_epsilon(ledger.history, delta)
        first = time.perf_counter() - start
        start = time.perf_counter()
        memo = memoised_epsilon(ledger.history, delta)
        again = time.perf_counter() - start
        out[n] = {"epsilon": eps, "today_seconds": today, "today_cpu_seconds": today_cpu,
                  "memoised_first_seconds": first,
                  "memoised_seconds": again,
                  "abs_diff": max(abs(eps - memo), abs(eps - memo_first))}
    return out


def profile_dp_step(n_items: int, cfg, batch_size: int, steps: int = 5, seed: int = 0
                    ) -> dict:
    """Where the DP step's extra time goes: torch operators (self CPU time per step) of a
    plain and a DP-hooks step side by side, and the top Python functions of the DP step
    (cProfile, cumulative)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    run_cfg, mcfg, weights, feats, topics, batch, data = _setup(n_items, cfg, "gru",
                                                                 batch_size, seed)
    ops: dict[str, dict[str, float]] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for name, arm in (("plain", StepArm("plain", "gru", None, False)),
                          ("dp-hooks", StepArm("dp-hooks", "gru", "hooks", True))):
            stepper = Stepper(arm, mcfg, weights, feats, topics, data, run_cfg, seed)
            stepper.step(batch)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    stepper.step(batch)
            for e in prof.key_averages():
                ops.setdefault(e.key, {"plain": 0.0, "dp-hooks": 0.0})[name] = \
                    e.self_cpu_time_total / steps / 1e3
        prof_py = cProfile.Profile()
        prof_py.enable()
        for _ in range(steps):
            stepper.step(batch)
        prof_py.disable()
    top_ops = sorted(ops.items(), key=lambda kv: -(kv[1]["dp-hooks"] - kv[1]["plain"]))[:15]
    stats = pstats.Stats(prof_py)
    entries = []
    for (file, line, fn), (_, nc, tt, ct, _) in sorted(stats.stats.items(),
                                                        key=lambda kv: -kv[1][3])[:25]:
        entries.append({"function": f"{file.rsplit('site-packages/', 1)[-1]}:{line}({fn})",
                        "calls_per_step": nc / steps, "cumulative_ms_per_step":
                            ct / steps * 1e3, "own_ms_per_step": tt / steps * 1e3})
    return {"steps": steps,
            "torch_ops_ms_per_step_by_extra_dp_time": [
                {"op": k, "plain_ms": v["plain"], "dp_hooks_ms": v["dp-hooks"]}
                for k, v in top_ops],
            "total_op_ms_per_step": {k: sum(v[k] for v in ops.values())
                                     for k in ("plain", "dp-hooks")},
            "dp_hooks_python_cumulative": entries}


def _over_plain(med: dict[str, float], kinds) -> dict[str, float]:
    """Each arm's median over its kind's plain median."""
    return {key: value / med[f"{kind}/plain"] for kind in kinds for key, value in med.items()
            if key.startswith(f"{kind}/") and key != f"{kind}/plain"}


def run(steps: int = 30, warmup: int = 3, batch_size: int = 8, n_items: int = 9742,
        kinds: tuple[str, ...] = ("gru",), modes: tuple[str, ...] = tuple(ARMS),
        round_reps: int = 2, round_segments: int = 24, profile: bool = False,
        overrides: dict | None = None, command: str = "") -> BenchResult:
    """`overrides`: RunConfig fields that shape the model (hidden, segment_len, n_negatives,
    model settings); default the RunConfig defaults, i.e. what a device trains."""
    from fedinterest.shared.config import RunConfig

    # on-device DP-SGD is what this bench times (the run default is distributed DP since issue 15)
    cfg = RunConfig.from_mapping({"dp": "event", **(overrides or {})}, source="dp-step --set")
    unknown = set(modes) - set(ARMS)
    if unknown or "plain" not in modes or "dp-hooks" not in modes:
        raise ValueError(f"modes must include plain and dp-hooks, from {sorted(ARMS)}; "
                         f"got {sorted(modes)}")
    arms = []
    for kind in kinds:
        for name in modes:
            mode, dp_model, opacus_dpgru = ARMS[name]
            if kind == "transformer" and name not in TRANSFORMER_ARMS:
                continue
            arms.append(StepArm(name, kind, mode, dp_model, opacus_dpgru))
    result = BenchResult(
        "dp-step", f"one optimizer step of the device model ({', '.join(kinds)}; hidden "
        f"{cfg.hidden}, segment {cfg.segment_len}, {cfg.n_negatives} negatives, batch "
        f"{batch_size}, {n_items} items, 1 torch thread): DP-SGD (Opacus) vs plain, same batch",
        command, "", "")
    torch.set_num_threads(1)  # what a simulated device runs with (client_app.train)
    times, cpu, failed, phases = step_times(arms, steps, warmup, n_items, cfg, batch_size)
    med = {k: median(v) for k, v in times.items()}
    med_cpu = {k: median(v) for k, v in cpu.items()}
    ratios, ratios_cpu = _over_plain(med, kinds), _over_plain(med_cpu, kinds)
    head = ratios_cpu["gru/dp-hooks"]
    best_key = min((k for k in ratios_cpu if k.startswith("gru/dp-")), key=ratios_cpu.get)
    result.summary = "CPU " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med_cpu.items()) \
        + f" (median of {steps} interleaved steps; wall " \
        + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in med.items()) + " ms)"
    result.ratio = (f"CPU gru dp-hooks/plain {verdict(head, TARGET, False)} (wall "
                    f"{ratios['gru/dp-hooks']:.3g}); best {best_key} {ratios_cpu[best_key]:.3g} "
                    f"(wall {ratios[best_key]:.3g})")
    if "transformer/dp-hooks" in ratios_cpu:
        result.ratio += (f"; transformer dp-hooks/plain {ratios_cpu['transformer/dp-hooks']:.3g}"
                         f" (wall {ratios['transformer/dp-hooks']:.3g})")
    if failed:
        result.summary += "; failed: " + ", ".join(sorted(failed))
    result.data = {"steps": steps, "warmup": warmup, "batch_size": batch_size,
                   "n_items": n_items, "model": {"hidden": cfg.hidden,
                                                 "segment_len": cfg.segment_len,
                                                 "n_negatives": cfg.n_negatives},
                   "torch_threads": 1, "seconds": times, "median_seconds": med,
                   "cpu_seconds": cpu, "median_cpu_seconds": med_cpu,
                   "ratios_over_plain": ratios, "cpu_ratios_over_plain": ratios_cpu,
                   "median_phase_seconds": phases,
                   "failed_arms": failed, "target": TARGET}
    if round_reps:
        rounds = round_times(round_reps, n_items, cfg, batch_size, round_segments)
        rmed = {k: median(v) for k, v in rounds["seconds"].items()}
        rcpu = {k: median(v) for k, v in rounds["cpu_seconds"].items()}
        rounds.update(median_seconds=rmed, median_cpu_seconds=rcpu,
                      ratio_dp_over_plain=rmed["dp-hooks"] / rmed["plain"],
                      cpu_ratio_dp_over_plain=rcpu["dp-hooks"] / rcpu["plain"])
        result.data["train_local_round"] = rounds
        result.ratio += (f"; whole train_local round (first round of a device, "
                         f"{rounds['steps']['dp-hooks']} steps) CPU "
                         f"{rounds['cpu_ratio_dp_over_plain']:.3g}")
    if round_reps:
        from fedinterest.client.dp_training import dp_steps, sample_rate

        q = sample_rate(round_segments, batch_size)
        acc = accountant_times(cfg.noise_multiplier, q,
                               dp_steps(cfg.local_epochs, round_segments, batch_size))
        result.data["accountant"] = {"sample_rate": q, "by_rounds_joined": acc}
        worst = acc[max(acc)]
        result.ratio += (f"; EventLedger.epsilon() after {max(acc)} rounds "
                         f"{worst['today_cpu_seconds']:.2f} s CPU (x2 per round)")
    if profile:
        result.data["profile_dp_hooks"] = profile_dp_step(n_items, cfg, batch_size)
    return result.finish()
