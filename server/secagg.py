"""Server side of hardened SecAgg+: Flower's SecAggPlusWorkflow with our mask generator.

Use it where Flower's workflow goes::

    DefaultWorkflow(fit_workflow=HardenedSecAggPlusWorkflow(num_shares, reconstruction_threshold))

with devices running `fedinterest.client.secagg.hardened_secaggplus_mod`. Over Flower's workflow
it adds: masks from `fedinterest.shared.secure_prg` (installed process-wide at import and on
every run); in SETUP it announces the generator and halts the round unless every device that
answered echoes it (a device on Flower's weak generator would turn the sum into garbage); and it
insists, as the devices do, that the reconstruction threshold is a strict majority of the shares;
it refuses 0-d model arrays, which Flower 1.42's unmask stage aggregates wrongly, and even
`num_shares` below the sample size, which Flower 1.42 cannot run; and it tolerates devices that
drop before sharing their keys, which fail Flower 1.42's round. It relays each device's key
certificate and signature (SETUP reply) to its neighbours with the keys (SHARE_KEYS), which
devices with a provisioned identity require (shared/secure_identity.py); the server can
relay them but cannot forge them.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import ERROR
from typing import Any

from flwr.app import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp.grid import Grid
from flwr.supercore import log

from ..shared.errors import ConfigError
from ..shared.secure_identity import AUTH_PREFIX, CERT_KEY, SIG_KEY
from ..shared.secure_prg import PRG_CONFIG_KEY, PRG_ID, install, mask_generator_is_hardened

__all__ = ["HardenedSecAggPlusWorkflow", "mask_generator_is_hardened"]

install()


class HardenedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """SecAggPlusWorkflow whose masks come from AES-256-CTR and whose SETUP checks devices.

    Same parameters as Flower's workflow. `reconstruction_threshold` must be a strict majority
    of `num_shares` (as a float: > 0.5); devices refuse anything less, see
    `fedinterest.client.secagg._check_setup` for why.
    """

    def __init__(
        self,
        # int = a count, float = a fraction (Flower's convention), so both are spelled out
        num_shares: int | float,  # noqa: PYI041
        reconstruction_threshold: int | float,  # noqa: PYI041
        **kwargs: Any,
    ) -> None:
        super().__init__(num_shares, reconstruction_threshold, **kwargs)
        t, n = self.reconstruction_threshold, self.num_shares
        if isinstance(t, float) and t <= 0.5:
            raise ConfigError(
                f"reconstruction_threshold={t}: as a fraction of the shares it must be > 0.5 "
                "(a strict majority), or devices refuse the round"
            )
        if isinstance(t, int) and isinstance(n, int) and 2 * t <= n:
            raise ConfigError(
                f"reconstruction_threshold={t} with num_shares={n}: must be at least {n // 2 + 1}"
                " (a strict majority), or devices refuse the round"
            )
        install()

    def __call__(self, grid: Grid, context: Context) -> None:
        """Run one SecAgg+ round with the hardened mask generator in force."""
        install()
        super().__call__(grid, context)

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's SETUP, plus: announce our generator, require it back, check the threshold."""
        _check_no_scalar_arrays(context)
        handshake = _SetupHandshake(grid)
        self._proofs = handshake.proofs
        try:
            proceed = super().setup_stage(handshake, context, state)  # type: ignore[arg-type]
        except _HaltRound as err:
            log(ERROR, "SecAgg+ round halted before sending anything: %s", err)
            return False
        if handshake.unconfirmed:
            log(
                ERROR,
                "SecAgg+ round halted: node(s) %s did not confirm mask generator %r; their masks "
                "would not cancel. Give them fedinterest.client.secagg.hardened_secaggplus_mod.",
                sorted(handshake.unconfirmed),
                PRG_ID,
            )
            return False
        return proceed

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's SHARE_KEYS, then forget nodes that dropped before sharing their keys.

        Flower 1.42 keeps such nodes in `sampled_node_ids`, so UNMASK lists them as dropped:
        devices hold no shares for them (KeyError) and the server finds too few shares, and one
        early dropout fails the round (measured). Nobody holds their secrets and nobody masked
        with them (pairwise masks are only added with nodes whose shares arrived), so removing
        them from the sampled set and from every neighbourhood releases nothing extra.
        """
        relay = _RelayProofs(grid, getattr(self, "_proofs", {}))
        proceed = super().share_keys_stage(relay, context, state)  # type: ignore[arg-type]
        shared = set(state.active_node_ids)
        state.sampled_node_ids = shared
        for neighbours in state.nid_to_neighbours.values():
            neighbours &= shared
        return proceed


def _check_no_scalar_arrays(context: LegacyContext) -> None:
    """Refuse 0-d arrays: Flower 1.42 aggregates them wrongly, silently.

    In `unmask_stage`, `for vec in aggregated_vector: vec += offset; vec *= ...` updates the
    arrays in place, but a 0-d array has already become a numpy scalar there, so its offset
    and weight division are lost (measured: 32.16 returned for a true mean of 1.24).
    """
    record = context.state.array_records.get(MAIN_PARAMS_RECORD)
    # Arrays that came through Flower's legacy conversion carry no shape metadata: decode them.
    scalars = [name for name, arr in (record or {}).items() if arr.numpy().ndim == 0]
    if scalars:
        raise ConfigError(
            f"SecAgg+: model array(s) {scalars} are 0-d; Flower's SecAgg+ mis-aggregates "
            "scalars. Give every array at least one dimension (reshape scalars to (1,))."
        )


class _HaltRound(Exception):
    pass


class _SetupHandshake:
    """Wraps the Grid for the SETUP stage only: stamps our PRG id on the outgoing config,
    checks the share parameters Flower computed for this round, records who did not echo.

    A wrapper instead of a copy of Flower's setup_stage keeps Flower's logic authoritative.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.unconfirmed: set[int] = set()
        self.proofs: dict[int, list[bytes]] = {}  # node -> [certificate, key signature]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            configs = msg.content.config_records[RECORD_KEY_CONFIGS]
            if configs.get(Key.STAGE) != Stage.SETUP:
                raise RuntimeError("SETUP handshake wrapper used outside the SETUP stage")
            share_num = int(configs[Key.SHARE_NUMBER])  # type: ignore[arg-type]
            threshold = int(configs[Key.THRESHOLD])  # type: ignore[arg-type]
            sample_num = int(configs[Key.SAMPLE_NUMBER])  # type: ignore[arg-type]
            if 2 * threshold <= share_num:
                raise _HaltRound(
                    f"this round's reconstruction threshold {threshold} is not a strict "
                    f"majority of {share_num} shares; raise reconstruction_threshold"
                )
            if share_num % 2 == 0 and share_num != sample_num:
                # Flower 1.42 then builds neighbourhoods of share_num + 1 but tells devices
                # share_num; they make too few shares and fail with IndexError (measured).
                raise _HaltRound(
                    f"num_shares={share_num} is even and below the {sample_num} sampled "
                    "devices, which Flower 1.42 cannot run; use an odd num_shares"
                )
            configs[PRG_CONFIG_KEY] = PRG_ID
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                continue
            configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is None or configs.get(PRG_CONFIG_KEY) != PRG_ID:
                self.unconfirmed.add(reply.metadata.src_node_id)
                continue
            proof = [configs.get(CERT_KEY), configs.get(SIG_KEY)]
            if all(isinstance(p, bytes) for p in proof):
                self.proofs[reply.metadata.src_node_id] = proof  # type: ignore[assignment]
        return replies


class _RelayProofs:
    """Wraps the Grid for SHARE_KEYS: next to each neighbour's key pair, the certificate and
    signature that neighbour sent at SETUP (under AUTH_PREFIX + node id)."""

    def __init__(self, grid: Grid, proofs: dict[int, list[bytes]]) -> None:
        self._grid = grid
        self._proofs = proofs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            configs = msg.content.config_records[RECORD_KEY_CONFIGS]
            for key in [k for k in configs if k.isdigit() and int(k) in self._proofs]:
                configs[AUTH_PREFIX + key] = list(self._proofs[int(key)])
        return self._grid.send_and_receive(messages, timeout=timeout)
