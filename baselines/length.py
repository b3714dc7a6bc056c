"""Response length: the longest (or shortest) responses fill the budget. docs/methods.md §1.6 / §7.

Xia et al. 2024 ("Rethinking data selection for supervised fine-tuning": the longest responses are a strong,
cheap baseline) and InstructDiff's Resp-LenMax. Length = the number of response (completion) tokens of a row
under the run's renderer, the same count the training stage and the token budget use
(``ctx.response_tokens``); the paper does not state its unit. ``order``: ``longest`` (default) |
``shortest``; ties break by id. Model-free.
"""

from __future__ import annotations

from typing import Any

from instructdiff.selection import Selection, SelectionContext, Selector

ORDERS = ("longest", "shortest")


def length_order(ids: list[str], tokens: dict[str, int], order: str = "longest") -> list[str]:
    """``ids`` sorted by response tokens (descending for longest, ascending for shortest), ties by id."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    sign = -1 if order == "longest" else 1
    return sorted(ids, key=lambda i: (sign * int(tokens[i]), i))


class LengthSelector(Selector):

    def __init__(self, budget: Any = None, order: str = "longest") -> None:
        super().__init__(budget)
        if order not in ORDERS:
            raise ValueError(f"selector.order must be one of {ORDERS}, got {order!r}")
        self.order = order

    def select(self, ctx: SelectionContext) -> Selection:
        ids = ctx.ids
        tokens = ctx.response_tokens
        ranked = length_order(ids, tokens, self.order)
        chosen = self.budget.take(ranked, tokens, len(ids), ctx.pool_tokens)
        scores = {i: {"response_tokens": int(tokens[i])} for i in ids}
        lengths = [int(tokens[i]) for i in chosen]
        stats = {"n_pool": len(ids), "order": self.order, "budget_unit": self.budget.unit,
                 "budget_limit": self.budget.limit(len(ids), ctx.pool_tokens), "selected_tokens": sum(lengths),
                 "selected_length_min": min(lengths, default=None),
                 "selected_length_max": max(lengths, default=None)}
        return Selection.build(ids, chosen, {}, scores, stats)
