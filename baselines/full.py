"""Full: every pool row; the budget does not apply (the upper reference of every comparison)."""

from __future__ import annotations

from instructdiff.selection import Selection, SelectionContext, Selector


class FullSelector(Selector):
    uses_budget = False

    def select(self, ctx: SelectionContext) -> Selection:
        return Selection.build(ctx.ids, ctx.ids, {}, stats={"n_pool": len(ctx.ids)})
