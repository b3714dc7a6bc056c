"""instructdiff's lm-eval task files (``id_*.yaml``) and their ``utils.py``.

The YAMLs carry ``{DATA_DIR}`` and ``{PROMPT_STYLE}`` placeholders; ``instructdiff.evaluate.render_tasks``
fills them in and copies ``utils.py`` beside them before lm-eval loads them.
"""
