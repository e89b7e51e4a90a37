"""Photo does not show what the listing claims (step ``category``).

Compares the seller's category (``ctx.category``) with the category the tagging step
predicted (``ctx.results["tagging"].data["category"]``). Runs only after tagging (the
pipeline skips it cleanly otherwise) and only flags when the prediction is confident: an
unsure model says nothing. Names are compared case- and punctuation-insensitively, and a
claimed category that appears among the tagging step's category tags counts as a match,
as does a taxonomy path sharing its leaf ("Home > Kitchen > Mugs" vs "mugs").
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from worker.config import Settings
from worker.pipeline.contract import Flag, ImageContext, StepResult

CATEGORY_TAG_SOURCES = ("category-map", "category-head")


def normalise(name: str) -> str:
    leaf = re.split(r"\s*(?:>|/|\|)\s*", name.strip())[-1]
    return re.sub(r"[^a-z0-9]+", " ", leaf.lower()).strip()


def same_category(a: str, b: str) -> bool:
    na, nb = normalise(a), normalise(b)
    if not na or not nb:
        return False
    return na == nb or na.rstrip("s") == nb.rstrip("s")


def predicted_category(data: dict[str, Any]) -> tuple[str | None, float, bool]:
    cat = data.get("category")
    if isinstance(cat, dict):
        name = cat.get("name") or cat.get("label")
        score = float(cat.get("score", 0.0))
        return name, score, bool(cat.get("confident", True))
    if isinstance(cat, str):
        return cat, float(data.get("category_score", 1.0)), True
    return None, 0.0, False


class CategoryStep:
    name: ClassVar[str] = "category"
    requires: ClassVar[tuple[str, ...]] = ("tagging",)
    VERSION: ClassVar[str] = "category@1"

    def version(self, settings: Settings) -> str:
        """A rules-only step: the version changes when its rules do."""
        return self.VERSION

    def run(self, ctx: ImageContext) -> StepResult:
        tagging = ctx.results.get("tagging")
        claimed = ctx.category
        if tagging is None or not claimed:
            return StepResult(data={"checked": False, "reason": "no claimed category" if tagging else "no tagging"})
        predicted, score, confident = predicted_category(tagging.data or {})
        data = {"checked": True, "claimed": claimed, "predicted": predicted, "score": round(score, 4)}
        if predicted is None or not confident or score < ctx.settings.category_mismatch_min_score:
            data["checked"] = False
            data["reason"] = "tagging is not confident about the category"
            return StepResult(data=data)
        if same_category(claimed, predicted):
            return StepResult(data=data)
        also = [t for t in tagging.tags if t.source in CATEGORY_TAG_SOURCES and same_category(claimed, t.name)]
        if also and also[0].score >= 0.5 * score:
            data["claimed_score"] = also[0].score
            return StepResult(data=data)
        evidence = {
            **data,
            "summary": f"The listing says {claimed!r} but the photo looks like {predicted!r} "
                       f"(confidence {score:.2f}).",
        }
        return StepResult(flags=[Flag("category_mismatch", round(score, 3), evidence)], data=data)
