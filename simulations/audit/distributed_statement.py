"""The audit statement's paragraph for distributed DP (dp = ddp-event / ddp-user): the
mechanism, unit, relation and threat model as results.json records them, and each device's
epsilon recomputed from the rounds it joined composed with the popularity count
(shared/distributed_dp_accounting.py; the count is a distributed Skellam too, its noise
added by the devices: shared/distributed_dp_count.py). The audit charges the count to every
device that joined a round (the run records who was counted only through their epsilons), at
the config's noise: an upper bound on each device's ledger."""

from __future__ import annotations

from fedinterest.shared.distributed_dp import DDPParams
from fedinterest.shared.distributed_dp_accounting import ddp_epsilon
from fedinterest.shared.distributed_dp_count import count_params
from fedinterest.simulations.audit.evidence import AuditRun

HEADING = "Distributed DP (noise shares under SecAgg+)"
# what the statement says about the noise's randomness (client/ddp_training.py)
DDP_NOISE_SEEDING = (
    "the secrecy of the distributed noise: each device draws its Skellam share and its "
    "conditional rounding from a Philox generator keyed by 128 bits of os.urandom per round "
    "and its segment sample from the OS CSPRNG (client/ddp_training.py); Philox is a "
    "counter-based PRNG, not a CSPRNG stream")


def distributed_paragraph(run: AuditRun, numbers: dict) -> tuple[str, str]:
    """The paragraph, and `numbers['distributed']` (per-device epsilons recomputed)."""
    cfg = run.config
    stmt = (run.results or {}).get("privacy", {}).get("distributed") or {}
    if not stmt:
        return HEADING, (f"dp = '{cfg.dp}', but results.json records no distributed-DP "
                         "statement (the run did not finish): no guarantee is stated.")
    event = cfg.dp == "ddp-event"
    params = DDPParams(clip=stmt["clip"], noise_multiplier=stmt["noise_multiplier"],
                       min_contributions=stmt["min_contributions"], scale=stmt["scale"],
                       dim=stmt["dim"])
    q = stmt["sample_rate"] if event else 1.0
    joined = (run.results or {}).get("privacy", {}).get("distributed", {}).get(
        "rounds_joined") or {}
    multiplier = stmt.get("popularity_noise_multiplier")
    count = count_params(cfg) if stmt.get("popularity_composed") else None
    per_device = {pid: ddp_epsilon(params, q, n, cfg.delta, count) for pid, n in joined.items()}
    e_max = max(per_device.values(), default=0.0)
    numbers["distributed"] = {"epsilon_max": e_max, "devices": len(per_device),
                              "popularity_noise_multiplier": multiplier,
                              "budget": stmt.get("budget"), "dim": params.dim,
                              "rounds_joined": sorted(set(joined.values()))}
    sampling = ("no amplification by sampling (the server chooses the devices)"
                if not event else
                "q = 1: each device uses every segment, so no amplification by sampling is "
                "claimed" if q >= 1 else
                f"each device keeps each of its segments with probability q = {q:g}, drawn "
                "from its OS CSPRNG (amplification by this sampling only; none by the "
                "server's choice of devices)")
    counted = ("" if count is None else
               f" and the popularity count (a distributed Skellam of effective multiplier "
               f"{count.effective_noise_multiplier:.4g} at this unit, charged to every device "
               f"here: each device adds its share to its scaled 0/1 vector before SecAgg+ "
               f"masks it, sized so that any {count.min_contributions} shares of a cohort "
               "carry the count's noise; a cohort with fewer contributors releases nothing, "
               "and the server adds no noise, so this part holds against the server too)")
    return HEADING, (
        f"Unit of privacy: {stmt['unit']}. Neighbouring relation: {stmt['relation']}. "
        f"Mechanism: {stmt['mechanism']}. Each device clips its contribution to L2 norm "
        f"C = {params.clip:g} over the {params.dim} privately trained coordinates (the only "
        f"coordinates it sends), rounds it to integers and adds a Skellam share sized so that "
        f"any {params.min_contributions} shares carry noise multiplier "
        f"{params.noise_multiplier:g}; a round with fewer contributors releases nothing "
        f"(the server drops it, and each device refuses to unmask it); a device that declines "
        f"still sends its noise share. {sampling[0].upper()}{sampling[1:]}. Threat model: "
        f"{stmt['threat_model']}. Accountant: Skellam RDP composed over the rounds each "
        f"device joined{counted}, at delta = {cfg.delta:g}: recomputed here from the rounds "
        "joined, "
        f"largest per-device epsilon {e_max:.3f} over {len(per_device)} devices (budget "
        f"{stmt.get('budget')}).")


def distributed_popularity_paragraph(run: AuditRun, pop: dict,
                                     numbers: dict) -> tuple[str, str]:
    """The popularity release (every mode): the devices' Skellam shares, the count's epsilon
    alone recomputed from the run config (shared/distributed_dp_count.py)."""
    from fedinterest.shared.distributed_dp_accounting import count_epsilon

    cfg = run.config
    count = count_params(cfg)
    user = count_params(cfg, replace=False)  # add/remove one device
    e_user, e_unit = count_epsilon(user, cfg.delta), count_epsilon(count, cfg.delta)
    numbers["popularity"] = {"epsilon": e_user, "run_unit_epsilon": e_unit,
                             "claimed": pop.get("epsilon"), "mechanism": "distributed Skellam"}
    scaled = pop.get("scaled_to_population")
    return ("Popularity release", (
        f"Released once before round 1: each device's 0/1 vector over at most "
        f"{cfg.popularity_max_items} of its training items, scaled by {count.scale} and "
        f"noised on the device with a Skellam share sized so that any "
        f"{count.min_contributions} shares of a cohort carry noise of standard deviation "
        f"{cfg.popularity_noise:g} x sqrt({cfg.popularity_max_items}) counts, then summed "
        f"under hardened SecAgg+ in cohorts ({pop.get('devices_summed')} devices summed); a "
        f"cohort with fewer contributors releases nothing. The server adds no noise: it "
        f"divides the unmasked sums by the scale and clamps negatives. Skellam RDP "
        f"(Agarwal et al. 2021), no amplification, delta = {cfg.delta:g}: epsilon "
        f"{e_user:.3f} for add/remove one device"
        + (f", {e_unit:.3f} at this run's unit (composed into each device's distributed-DP "
           "ledger above)" if cfg.distributed_dp else
           " (charged to each counted device's ledger at the user unit)")
        + f". Threat model: the server and the wire, if at least {count.min_contributions} "
        f"devices of a cohort add their shares (each device sizes its share for at most its "
        f"policy's max_assumed_honest devices, whatever m the server asks for); the server "
        f"sees each cohort's noisy sum."
        + (f" The counts were then scaled by {scaled['factor']:.4g} to the federation's "
           f"{scaled['population']} devices (post-processing)." if scaled else "")))
