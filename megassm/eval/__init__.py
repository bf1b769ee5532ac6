"""Evaluation of a stage: held-out flow-matching loss (``heldout``), CLIP score (``clip_score``), FID / KID / FVD
(``frechet`` over ``inception`` / video features), for ``megassm eval`` (``megassm/evaluate.py``) and
train.eval_every (``megassm/train/evaluation.py``)."""
