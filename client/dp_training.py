"""One federated round of on-device training: DP-SGD with Opacus (event level) or plain.

Privacy unit: one disjoint segment of the user's history (shared/sequences.py). A round takes
`dp_steps` DP-SGD steps; each Poisson-samples segments at the fixed rate q = `dp_sample_rate`,
clips each segment's gradient to `max_grad_norm`, adds Gaussian noise of std
`noise_multiplier * max_grad_norm` to the sum and divides by the fixed `batch_size` (none of
them a function of n: docs/PRIVACY.md, finding 4). The device's `EventLedger` composes every
step of every round (RDP), and a round that would exceed the budget is declined before
training, the global weights returned untouched.
FedProx's pull towards the global weights runs after each step; it never reads the data, so
it is post-processing and costs no privacy. Randomness is seeded from `seed` (experiments);
a deployment should use Opacus' `secure_mode`. Why SGD is the default optimizer, and why
secure_mode is not available here: docs/BENCHMARKS.md, "On-device optimizer and secure_mode".
"""

from __future__ import annotations

import copy
import itertools
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from fedinterest.shared.config import RunConfig
from fedinterest.shared.model import (
    InterestModel,
    ModelConfig,
    build_model,
    get_weights,
    set_weights,
)
from fedinterest.shared.privacy import EventLedger
from fedinterest.shared.sequences import BATCH_KEYS, SegmentDataset, collate

SAMPLE_KEYS = (*BATCH_KEYS, "negatives")
OPTIMIZERS = ("adam", "sgd")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")


@dataclass
class TrainResult:
    weights: list[np.ndarray]  # ordered as weight_schema(model); the new local weights
    num_examples: int  # segments in the device's training data
    steps: int  # optimizer steps taken (DP-SGD steps)
    loss: float  # mean training loss over the round (NaN when no step ran)
    epsilon: float  # the device's event-level epsilon after this round (0 without DP)
    refused: str | None  # None, or why the round was declined (budget; no data)


def sample_rate(n_examples: int, batch_size: int) -> float:
    """Poisson sampling rate q = min(1, B / n) for an expected batch of B segments."""
    return min(1.0, batch_size / n_examples)


def dp_steps(local_epochs: int, n_examples: int, batch_size: int) -> int:
    """ceil(epochs / q) DP-SGD steps, in integers (1 / (2 / 98) is 49.00000000000001)."""
    if n_examples <= batch_size:
        return local_epochs
    return -(-local_epochs * n_examples // batch_size)


class SegmentTuples(torch.utils.data.Dataset):
    """Segments as tuples in a fixed key order, for Opacus' DPDataLoader (see the module
    docstring: an empty first Poisson draw breaks dict samples); `as_batch` rebuilds the dict."""

    def __init__(self, data: SegmentDataset):
        self.data = data
        self.keys = tuple(k for k in SAMPLE_KEYS if k != "negatives" or data.n_negatives)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        ex = self.data[i]
        return tuple(ex[k] for k in self.keys)

    def as_batch(self, collated: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        return dict(zip(self.keys, collated))


def build_local_model(model_cfg: ModelConfig, global_weights: list[np.ndarray],
                      item_feats: np.ndarray, topic_dist: np.ndarray | None,
                      neg_probs: np.ndarray | None, dp: bool) -> InterestModel:
    """The global model as a device trains it: the DP model (HoistedGRU) when `dp`, public
    catalog attached."""
    model = build_model(replace(model_cfg, dp=dp))
    model.attach_catalog(item_feats=item_feats, topic_dist=topic_dist, neg_probs=neg_probs)
    set_weights(model, global_weights)
    return model


#: the DP model and its Opacus wrapping (GradSampleModule, hooks mode) kept by this process
#: between rounds, keyed by the model's config: a simulation worker serves many devices and
#: a phone many rounds, and only the weights change. `resident_dp_model` scrubs every trace
#: of the previous round (gradients, per-sample gradients, Opacus' captured activations)
#: and loads the new weights; the optimizer, DPOptimizer, data loader, noise and sampling
#: generators are new every round, and the privacy accounting is the device's own ledger.
_RESIDENT: dict[str, list] = {}  # key -> [model, GradSampleModule or None]
_RESIDENT_MAX = 2


def _resident_key(model_cfg: ModelConfig) -> str:
    return json.dumps(asdict(replace(model_cfg, dp=True)), sort_keys=True)


def resident_dp_model(model_cfg: ModelConfig, global_weights: list[np.ndarray],
                      item_feats: np.ndarray, topic_dist: np.ndarray | None,
                      neg_probs: np.ndarray | None) -> InterestModel:
    """`build_local_model(..., dp=True)`, reusing this process's model of the same config:
    scrubbed of the last round's state (`scrub_round_state`), catalog attached and the
    global weights loaded. The first call builds it."""
    key = _resident_key(model_cfg)
    entry = _RESIDENT.get(key)
    if entry is None:
        if len(_RESIDENT) >= _RESIDENT_MAX:
            _RESIDENT.pop(next(iter(_RESIDENT)))
        model = build_local_model(model_cfg, global_weights, item_feats, topic_dist,
                                  neg_probs, dp=True)
        _RESIDENT[key] = [model, None]
        return model
    model = entry[0]
    scrub_round_state(model)
    # the catalog buffers as a fresh build has them, then this round's
    model.item_feats = torch.zeros(0, model.cfg.item_feat_dim)
    model.topic_dist = torch.zeros(0, model.cfg.n_topics)
    model.log_q = torch.zeros(0)
    model.attach_catalog(item_feats=item_feats, topic_dist=topic_dist, neg_probs=neg_probs)
    set_weights(model, global_weights)
    return model


def scrub_round_state(model: torch.nn.Module) -> None:
    """Remove what a DP-SGD round leaves on a model: gradients, Opacus' per-sample gradients
    and sums on the parameters, the activations its hooks captured on the layers (left
    behind when a round stopped between a forward and its backward)."""
    for p in model.parameters():
        p.grad = None
        for attr in ("_current_grad_sample", "_norm_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
        if hasattr(p, "grad_sample"):
            p.grad_sample = None
            p._forward_counter = 0
    for m in model.modules():
        for attr in ("activations", "max_batch_len"):
            if attr in m.__dict__:
                delattr(m, attr)


def _resident_wrapping(model: torch.nn.Module):
    """The Opacus GradSampleModule kept for `model` (a resident model), or None."""
    for entry in _RESIDENT.values():
        if entry[0] is model:
            return entry
    return None


def _round_model(model_cfg: ModelConfig, global_weights: list[np.ndarray],
                 item_feats: np.ndarray, topic_dist: np.ndarray | None,
                 neg_probs: np.ndarray | None, dp: bool, grad_sample_mode: str):
    """The round's model in training mode: the resident DP model under DP-SGD with hooks,
    else a fresh build. The caller seeds dropout after this, so that a resident model (no
    build, no init draws) and a fresh one drop out the same units: a round's result does
    not depend on the cache."""
    if dp and grad_sample_mode == "hooks":
        return resident_dp_model(model_cfg, global_weights, item_feats, topic_dist,
                                 neg_probs).train()
    return build_local_model(model_cfg, global_weights, item_feats, topic_dist, neg_probs,
                             dp=dp).train()


def _make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer {name!r}: expected one of {OPTIMIZERS}")


def _result(weights, data, steps, loss_sum, n_seen, epsilon, refused=None) -> TrainResult:
    return TrainResult(weights=weights, num_examples=len(data), steps=steps,
                       loss=loss_sum / n_seen if n_seen else float("nan"),
                       epsilon=float(epsilon), refused=refused)


def train_local(model_cfg: ModelConfig, global_weights: list[np.ndarray], data: SegmentDataset,
                item_feats: np.ndarray, topic_dist: np.ndarray | None, cfg: RunConfig,
                ledger: EventLedger | None, server_round: int, seed: int,
                proximal_mu: float = 0.0, *, optimizer: str | None = None,
                secure_mode: bool = False, grad_sample_mode: str = "hooks",
                step_callback: Callable[[torch.optim.Optimizer], None] | None = None,
                privacy_engine=None) -> TrainResult:
    """One round of local training of the global model on this device's segments.

    With a `ledger`: event-level DP-SGD (the model uses HoistedGRU), `cfg.dp_steps` steps at
    the fixed sample rate `cfg.dp_sample_rate`, the noisy sum divided by `cfg.batch_size`;
    the round is declined untouched if it would take the ledger past `cfg.device_epsilon`,
    else recorded in the ledger, which the caller persists. Without one: plain training for
    `cfg.local_epochs` epochs of shuffled batches. Torch's thread count is left to the caller.

    Args:
        model_cfg, global_weights: the model's shape and the server's weights.
        data, item_feats, topic_dist: the device's segments and the catalog inputs.
        cfg, ledger: the run settings; the event-level ledger, or None for no DP.
        server_round, seed: the round (ledger) and the seed of sampling, negatives, noise.
        proximal_mu: FedProx's pull towards the global weights after each step (0: none).
        optimizer, secure_mode, grad_sample_mode, privacy_engine: optimizer ("sgd"/"adam",
            default `cfg.client_optimizer`) and Opacus settings (default: a fresh engine).
        step_callback: called with the optimizer after every step, before the FedProx pull.

    Returns:
        TrainResult: weights, examples, steps, mean loss, epsilon, and why it was `refused`.
    """
    _check_arguments(model_cfg, data, cfg, ledger, grad_sample_mode, proximal_mu)
    if len(data) == 0:
        eps = ledger.epsilon() if ledger is not None else 0.0
        return _result([np.array(w, copy=True) for w in global_weights], data, 0, 0.0, 0, eps,
                       refused="no data: the device has no training segments")

    nm, clip = cfg.noise_multiplier, cfg.max_grad_norm
    # event DP: q, the step count and the divisor of the noisy sum are fixed by the config,
    # never functions of n, so nothing a round does tells neighbouring histories apart
    q = cfg.dp_sample_rate if ledger is not None else sample_rate(len(data), cfg.batch_size)
    if ledger is not None:
        steps = cfg.dp_steps
        eps = ledger.epsilon_after(nm, q, steps)
        if eps > cfg.device_epsilon:
            return _result([np.array(w, copy=True) for w in global_weights], data, 0, 0.0, 0,
                           ledger.epsilon(), refused=f"privacy budget: epsilon would reach "
                           f"{eps:.3f} > budget {cfg.device_epsilon:g}")

    # one child seed per source of randomness: dropout, negatives, batch sampling, noise
    s_dropout, s_neg, s_sample, s_noise = np.random.SeedSequence(seed).generate_state(4)
    local = copy.copy(data)  # same arrays, own negative sampler: the caller's one is untouched
    local.rng = np.random.default_rng(s_neg)
    sampler_gen = torch.Generator().manual_seed(int(s_sample))

    with torch.random.fork_rng(devices=[]):  # seeds dropout without touching the caller's RNG
        model = _round_model(model_cfg, global_weights, item_feats, topic_dist,
                             data.neg_probs, ledger is not None, grad_sample_mode)
        torch.manual_seed(int(s_dropout))  # after the build: see _round_model
        params = [p for p in model.parameters() if p.requires_grad]
        anchor = [p.detach().clone() for p in params]
        opt = _make_optimizer(optimizer or cfg.client_optimizer, params, cfg.lr)
        pull = cfg.lr * proximal_mu

        def after_step(o: torch.optim.Optimizer) -> None:
            if step_callback is not None:
                step_callback(o)
            if pull > 0:
                with torch.no_grad():
                    for p, g in zip(params, anchor):
                        p.sub_(pull * (p - g))

        if ledger is None:
            steps, loss_sum, n_seen = _plain_training(model, opt, local, cfg, sampler_gen,
                                                      after_step)
            return _result(get_weights(model), data, steps, loss_sum, n_seen, 0.0)

        engine = privacy_engine or _new_engine(secure_mode)
        loss_sum, n_seen = _dp_sgd(model, opt, local, q, steps, nm, clip, int(s_noise),
                                   sampler_gen, engine, grad_sample_mode, after_step,
                                   expected_batch=cfg.batch_size)
    eps = ledger.record(server_round, nm, q, steps)
    return _result(get_weights(model), data, steps, loss_sum, n_seen, eps)


def _check_arguments(model_cfg: ModelConfig, data: SegmentDataset, cfg: RunConfig,
                     ledger: EventLedger | None, grad_sample_mode: str,
                     proximal_mu: float) -> None:
    """train_local's preconditions; a mismatch is a programming error (ValueError)."""
    if (ledger is not None) != cfg.event_dp:
        raise ValueError(f"RunConfig.dp={cfg.dp!r} but a ledger was "
                         f"{'given' if ledger is not None else 'not given'}: event-level DP "
                         "needs the device's EventLedger, and only then")
    if ledger is not None and ledger.delta != cfg.delta:
        raise ValueError(f"the device ledger accounts at delta={ledger.delta}, the run config "
                         f"says delta={cfg.delta}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode {grad_sample_mode!r}: expected one of "
                         f"{GRAD_SAMPLE_MODES}")
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    if (model_cfg.neg_sampling == "pop") != (data.neg_probs is not None):
        raise ValueError(f"ModelConfig.neg_sampling={model_cfg.neg_sampling!r} but the dataset "
                         f"samples negatives {'by' if data.neg_probs is not None else 'without'}"
                         " neg_probs: the logQ correction would not match the sampling")


def _plain_training(model, opt, data: SegmentDataset, cfg: RunConfig,
                    sampler_gen: torch.Generator, after_step: Callable) -> tuple[int, float, int]:
    """Non-private local training (shuffled batches); returns (steps, loss sum, examples)."""
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True,
                                         generator=sampler_gen, collate_fn=collate)
    steps, loss_sum, n_seen = 0, 0.0, 0
    for _ in range(cfg.local_epochs):
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            per_example, _ = model.example_losses(batch)
            per_example.mean().backward()
            opt.step()
            after_step(opt)
            steps += 1
            loss_sum += float(per_example.detach().sum())
            n_seen += len(per_example)
    return steps, loss_sum, n_seen


def _new_engine(secure_mode: bool):
    from opacus import PrivacyEngine

    try:
        with warnings.catch_warnings():  # the "secure RNG turned off" notice: see module doc
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            return PrivacyEngine(accountant="rdp", secure_mode=secure_mode)
    except ImportError as e:
        raise RuntimeError("secure_mode=True needs the torchcsprng package, which is not "
                           "installed (its last release, 0.2.1, predates this torch)") from e


def _dp_sgd(model, opt, data: SegmentDataset, q: float, steps: int, nm: float, clip: float,
            noise_seed: int, sampler_gen: torch.Generator, engine, grad_sample_mode: str,
            after_step: Callable, expected_batch: float | None = None) -> tuple[float, int]:
    """`steps` DP-SGD steps through Opacus; returns (sum of per-example losses, examples).

    Opacus 1.6's `make_private(poisson_sampling=True)` would derive q as 1 / len(loader) and
    the expected batch as int(n * q), so we Poisson-sample with our own `DPDataLoader` at
    exactly q and give the optimizer and the accountant that q and the fixed divisor
    `expected_batch` (q * n when None; on a device q * n would leak n). The loader sees tuples in a fixed key order (`SegmentTuples`): with dict samples, an empty
    first draw crashes Opacus' empty-batch builder. An empty draw still takes a (noise-only)
    step, as the accountant counts it."""
    from opacus.data_loader import DPDataLoader
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    secure_mode = engine.secure_mode
    tuples = SegmentTuples(data)
    loader = DPDataLoader(tuples, sample_rate=q,
                          generator=engine.secure_rng if secure_mode else sampler_gen)
    noise_gen = None if secure_mode else torch.Generator().manual_seed(noise_seed)
    resident = _resident_wrapping(model) if grad_sample_mode == "hooks" else None
    if resident is not None and resident[1] is not None:
        # the model's hooks are in place from an earlier round: only the optimizer is new
        from opacus.optimizers import DPOptimizer

        module = resident[1]
        dp_opt = DPOptimizer(opt, noise_multiplier=nm, max_grad_norm=clip,
                             expected_batch_size=1, loss_reduction="mean",
                             generator=engine.secure_rng if secure_mode else noise_gen,
                             secure_mode=secure_mode)
    else:
        private = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=nm,
            max_grad_norm=clip, loss_reduction="mean", poisson_sampling=False,  # Poisson above
            noise_generator=noise_gen, grad_sample_mode=grad_sample_mode)
        module, dp_opt, loader = private[0], private[1], private[-1]
        if resident is not None:
            resident[1] = module
    module.forbid_grad_accumulation()  # what make_private does under Poisson sampling
    # make_private assumed q = 1 / len(loader); give the optimizer and the accountant ours
    # the fixed divisor of the noisy sum (the config's batch size); q * n would leak n
    dp_opt.expected_batch_size = expected_batch if expected_batch is not None else q * len(data)
    dp_opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=q))

    loss_sum, n_seen = 0.0, 0
    draws = itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps)
    try:
        with warnings.catch_warnings():
            # torch notes that the first layers' inputs need no gradient; Opacus' hooks only
            # need the gradients of the layers' outputs, so the notice is noise here
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for sample in draws:
                batch = tuples.as_batch(sample)
                dp_opt.zero_grad(set_to_none=True)
                per_example, _ = model.example_losses(batch)  # Opacus' hooks sit on its layers
                if grad_sample_mode == "ghost":
                    DPTensorFastGradientClipping(module, dp_opt, per_example, "mean").backward()
                else:
                    # an empty draw gives a NaN mean but empty gradients: Opacus noises a zero sum
                    per_example.mean().backward()
                dp_opt.step()
                after_step(dp_opt)
                loss_sum += float(per_example.detach().sum())
                n_seen += len(per_example)
    finally:  # no per-sample gradient of this device outlives its round (resident model)
        scrub_round_state(model)
    return loss_sum, n_seen
