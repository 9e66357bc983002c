"""LoRA factors of expert stacks: one projection's ``A``/``B`` (:class:`LoRAFactors`) and an
expert MLP's pair of them (:class:`ExpertLoRA`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.checks import check


@dataclass
class LoRAFactors:
    """One projection's adapter: ``delta_e = scale * a[e] @ b[e]`` in ``[E, in, out]`` layout.

    ``a [E, in, r]``, ``b [E, r, out]``; several adapters add up by concatenating along ``r``.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float = 1.0

    def delta(self) -> torch.Tensor:
        """The dense ``[E, in, out]`` delta (for tests and merging only)."""
        return torch.bmm(self.a, self.b) * self.scale

    def check(self, num_experts: int, d_in: int, d_out: int, where: str) -> None:
        a, b = self.a, self.b
        check(a.dim() == 3 and b.dim() == 3 and a.shape[2] == b.shape[1],
              lambda: f"{where}: LoRA factors must be a [E, in, r] and b [E, r, out], got "
              f"{tuple(a.shape)} and {tuple(b.shape)}")
        check(a.shape[:2] == (num_experts, d_in) and (b.shape[0], b.shape[2]) == (num_experts,
                                                                                 d_out),
              lambda: f"{where}: LoRA factors must be [{num_experts}, {d_in}, r] and "
              f"[{num_experts}, r, {d_out}], got {tuple(a.shape)} and {tuple(b.shape)}")


def concat_outputs(parts: list[tuple[LoRAFactors | None, int]]) -> LoRAFactors | None:
    """One adapter for projections whose outputs are concatenated (gate and up into gate_up):
    ``parts`` lists each projection's factors (or ``None``) and output width in order.

    Exact: ``x [A_1 .. A_n] blockdiag(s_1 B_1, .., s_n B_n)`` is the concatenation of the
    ``s_i x A_i B_i`` (zero columns where a projection has no adapter); scales stay outside
    when they are all equal.
    """
    present = [i for i, (f, _) in enumerate(parts) if f is not None]
    if not present:
        return None
    scales = {parts[i][0].scale for i in present}
    same = len(scales) == 1
    rows = []
    for i in present:
        f = parts[i][0]
        cols = [(f.b if same else f.b * f.scale) if j == i else
                f.b.new_zeros(f.b.shape[0], f.b.shape[1], width)
                for j, (_, width) in enumerate(parts)]
        rows.append(torch.cat(cols, dim=2))
    a = torch.cat([parts[i][0].a for i in present], dim=2)
    return LoRAFactors(a, torch.cat(rows, dim=1), scales.pop() if same else 1.0)


@dataclass
class ExpertLoRA:
    """Adapters of an expert MLP: on ``gate_up`` (``[E, H, r]``, ``[E, r, 2I]``) and/or
    ``down`` (``[E, I, r]``, ``[E, r, H]``)."""

    gate_up: LoRAFactors | None = None
    down: LoRAFactors | None = None

    def check(self, num_experts: int, hidden: int, intermediate: int, where: str,
              gated: bool = True) -> None:
        """Both adapters' shapes fit ``num_experts`` experts of ``hidden -> intermediate``
        (the first projection ``2 * intermediate`` wide when ``gated``)."""
        if self.gate_up is not None:
            width = 2 * intermediate if gated else intermediate
            self.gate_up.check(num_experts, hidden, width, f"{where} gate_up")
        if self.down is not None:
            self.down.check(num_experts, intermediate, hidden, f"{where} down")
