"""No eval item is something a selector or the calibration saw: every domain's whole pool and query set are
checked against the items of its eval tasks by content (normalised prompt text and reference answer)."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from instructdiff import CONF_DIR
from instructdiff.data import load_pool
from instructdiff.evaluate import DATA_DIR, TASKS_SRC
from instructdiff.queries import load_queries
from instructdiff.render import user_message

DOMAINS = ("math", "medical", "general", "code")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def eval_items(task: str) -> list[dict]:
    """The docs of one of instructdiff's lm-eval tasks after its own process_docs (no lm-eval involved)."""
    from datasets import load_dataset

    from instructdiff.lm_eval_tasks import utils

    text = (TASKS_SRC / f"{task}.yaml").read_text(encoding="utf-8")
    data_file = re.search(r'^\s*data_files:\s*"([^"]+)"', text, flags=re.M).group(1)
    process = re.search(r"^process_docs:\s*!function utils\.(\w+)", text, flags=re.M).group(1)
    ds = load_dataset("json", data_files=data_file.replace("{DATA_DIR}", str(DATA_DIR)))["train"]
    return list(getattr(utils, process)(ds))


@pytest.mark.parametrize("domain", DOMAINS)
def test_no_eval_item_is_in_the_pool_or_the_query_set(domain: str) -> None:
    cfg = OmegaConf.load(CONF_DIR / "domain" / f"{domain}.yaml")
    cfg.pool_size = None  # the whole file: any pool_seed draws from it
    pool, _ = load_pool(cfg, seed=0)
    seen = pool + load_queries(cfg)
    prompts = {_norm(user_message(r)) for r in seen} | {_norm(r.instruction) for r in seen}
    # a reference is checked when it is long enough to be the item's own (a worked solution, a paragraph):
    # short multiple-choice answers ("The answer is C: Salmonella typhi.") legitimately recur across questions
    answers = {_norm(r.response) for r in seen if len(r.response.split()) >= 12}
    checked = 0
    for task in cfg.eval_tasks:
        for doc in eval_items(task):
            user = _norm(doc.get("user", ""))
            assert user not in prompts, f"{domain}: an item of {task} is a pool or query prompt: {user[:120]}"
            reference = _norm(doc.get("reference") or "")
            if len(reference.split()) >= 12:
                assert reference not in answers, f"{domain}: a reference of {task} is a pool response"
            checked += 1
    assert checked >= 500, (domain, checked)
