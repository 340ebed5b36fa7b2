"""What a pruning run did, counted from the weights afterwards: the report every run returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from llmprune.models import EXPERT_INDEX


@dataclass
class LayerReport:
    name: str  # "layers.{i}.{linear}"
    shape: tuple[int, int]
    zeros: int
    numel: int
    info: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class PruneReport:
    """What a pruning run did, counted from the weights afterwards (returned by
    :func:`llmprune.prune` and :func:`llmprune.run`; ``PruneResult.report`` of
    :func:`llmprune.prune_model`).

    ``config``: the PruneConfig as a dict; ``model``: its name; ``layers``: one
    :class:`LayerReport` per pruned layer (name, shape, zeros, numel, method info);
    ``block_seconds`` and ``seconds``: the time per block and in all; ``calibration``: the data
    used (source, windows, seqlen), None without calibration; ``versions``: of the libraries;
    ``phase_seconds``: per block, seconds collecting statistics, pruning and propagating;
    ``allocation``: per-block targets; ``structured``: a shrink method's plan and parameter counts;
    ``depth``: a depth method's removed blocks and block scores;
    ``quantization``: what ``quantize`` did; ``offload``: block loads and writes. ``to_dict()`` is
    the ``"prune"`` section of a result record; ``table()`` the text ``llmprune prune`` prints.

    Example::

        >>> import llmprune
        >>> model, tok = llmprune.load_model("smollm2-135m")
        >>> report = llmprune.prune(model, tok, llmprune.PruneConfig(method="magnitude", sparsity=0.5))
        >>> round(report.overall_sparsity, 3)
        0.5
        >>> print(report.table())  # doctest: +SKIP
    """

    config: dict
    model: str
    layers: list[LayerReport]
    block_seconds: list[float]
    seconds: float
    calibration: dict | None
    versions: dict
    # per block, seconds in each phase: "stats" (hooked pass), "prune" (score + mask or solve),
    # "propagate" (pruned block, hooks off): where a regression shows
    phase_seconds: dict[str, list[float]] = field(default_factory=dict)
    # per-block targets (allocation.py): "allocation", "block_sparsity", OWL's "outlier_ratio", ...
    allocation: dict | None = None
    # structured methods (structured.py): the plan and the parameters before/after; --quantize: what it did
    structured: dict | None = None
    quantization: dict | None = None
    # depth methods (drop.py): the blocks removed, each block's score, the parameters before/after
    depth: dict | None = None
    # --offload (offload.py): the store's mode, block loads and writes, peak blocks materialised at once
    offload: dict | None = None

    @property
    def overall_sparsity(self) -> float:
        numel = sum(layer.numel for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / numel if numel else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        for layer, src in zip(out["layers"], self.layers):
            layer["shape"] = list(src.shape)
            layer["sparsity"] = src.sparsity
        out["overall_sparsity"] = self.overall_sparsity
        return out

    def table(self, per_layer: bool = False) -> str:
        """A compact text table: sparsity per linear kind (or per layer), then the total."""
        rows: dict[str, list[int]] = {}
        for layer in self.layers:
            key = layer.name if per_layer else layer.name.split(".", 2)[2]
            if not per_layer and "routed_tokens" in layer.info:  # one row for all experts
                key = EXPERT_INDEX.sub(".*.", key, count=1)
            zeros_numel = rows.setdefault(key, [0, 0])
            zeros_numel[0] += layer.zeros
            zeros_numel[1] += layer.numel
        width = max([len(k) for k in rows] + [10])
        lines = [f"{'layer':<{width}}  {'sparsity':>8}  {'params':>12}"]
        for key, (zeros, numel) in rows.items():
            lines.append(f"{key:<{width}}  {zeros / numel:>8.4f}  {numel:>12,}")
        total = sum(n for _, n in rows.values())
        lines.append(f"{'total':<{width}}  {self.overall_sparsity:>8.4f}  {total:>12,}")
        if self.allocation and self.allocation.get("allocation") != "uniform":
            targets = self.allocation["block_sparsity"]
            lines.append(f"allocation {self.allocation['allocation']}: block sparsity "
                         + " ".join(f"{s:.3f}" for s in targets))
        if self.depth:
            d = self.depth
            lines.append(f"removed blocks {d['removed_blocks']} of {d['blocks_before']} ({d['method']}); "
                         f"parameters {d['params_before']:,} -> {d['params_after']:,}")
        blocks = len(self.block_seconds)
        per_block = sum(self.block_seconds) / blocks if blocks else 0.0
        lines.append(f"pruned in {self.seconds:.1f} s ({blocks} blocks, {per_block:.2f} s per block)")
        if self.offload:
            o = self.offload
            lines.append(f"offload {o['mode']} (compute on {o['compute']}): {o['loads']} block loads, "
                         f"{o['writes']} write-backs, at most {o['peak_blocks']} block(s) materialised at "
                         "once"
                         + (f"; {o['bytes_read'] / 2**20:.1f} MiB read, "
                            f"{o['bytes_written'] / 2**20:.1f} MiB written" if o["mode"] == "disk" else ""))
        experts = self.expert_tokens()
        if experts:
            counts = sorted(experts.values())
            starved = [name for name, n in experts.items() if n == 0]
            named = ", ".join(starved[:8]) + (f", ... ({len(starved) - 8} more in the JSON)"
                                              if len(starved) > 8 else "")
            lines.append(f"experts: {len(counts)} expert matrices, calibration tokens routed to each: min "
                         f"{counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}"
                         + (f"; {len(starved)} got none and were pruned by magnitude: {named}"
                            if starved else ""))
        return "\n".join(lines)

    def expert_tokens(self) -> dict[str, int]:
        """Calibration tokens routed to each expert matrix (MoE models), by layer name."""
        return {layer.name: layer.info["routed_tokens"] for layer in self.layers
                if "routed_tokens" in layer.info}
