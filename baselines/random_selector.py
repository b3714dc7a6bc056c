"""Random: a uniform sample without replacement of the budget, seeded (docs/methods.md §7)."""

from __future__ import annotations

from instructdiff.selection import Selection, SelectionContext, Selector


class RandomSelector(Selector):

    def select(self, ctx: SelectionContext) -> Selection:
        ids = ctx.ids
        order = [ids[k] for k in ctx.rng.permutation(len(ids))]
        chosen = self.budget.take(order, ctx.response_tokens, len(ids), ctx.pool_tokens)
        return Selection.build(ids, chosen, {}, stats={"n_pool": len(ids)})
