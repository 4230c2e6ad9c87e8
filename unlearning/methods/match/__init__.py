"""match: fine-tune until the forget set can no longer be told from data the model never saw,
and stop as soon as the question the verifier will ask says so.

Read in this order:

* ``config.py``: the settings (``MatchConfig``) and how ``auto`` resolves for a task.
* ``statistics.py``: what is pulled and towards what. With reference statistics (the method's
  half), **per sample**: each forget sample's logit-scaled confidence is pulled (absolute
  gap, so the pull is bounded) towards its own target, the value a model that never saw it
  would give, predicted from its OUT mean under the references plus a residual dealt at
  random so that the forget set's spread around those predictions is unseen data's. Without
  references, **by distribution**: a forget batch's sorted statistic is pulled (1-D
  Wasserstein) onto the quantiles of the original's statistic on ``unseen_match``; the
  statistic is the label's probability, loss or margin loss by the forget set's size.
* ``stopping.py``: the stopping rule, on ``unseen_stop`` (a part of ``unseen`` never matched
  against): per sample, a KS test of the forget set's scores against unseen_stop's; else the
  verifier's population attack, its KS test for a handful of samples, or label rates for
  class and backdoor.
* ``head.py``: where the classifier head holds most parameters, only the head trains, on
  head inputs computed once.
* ``run.py``: the run, top to bottom, with the utility guards: retain cross-entropy, KL to the
  original's predictions on retain and unseen_match batches, frozen normalisation statistics,
  a utility veto on unseen_stop's accuracy and the best useful checkpoint.

Slice names: docs/methods.md, "Data slices". Why each choice, with the runs that chose it:
unlearning/README.md, "match: design" and "match: measurement history".
"""

from unlearning.methods.match.config import (
    MatchConfig,
    resolve_statistic,
    resolve_stopping,
    resolve_trainable,
)
from unlearning.methods.match.head import (
    HEAD_INPUT_CACHE_BYTES,
    classifier_head,
    head_inputs,
    head_logits,
)
from unlearning.methods.match.run import Match
from unlearning.methods.match.statistics import PerSampleTargets, label_statistic
from unlearning.methods.match.stopping import steps_to_next_check

__all__ = ["HEAD_INPUT_CACHE_BYTES", "Match", "MatchConfig", "PerSampleTargets",
           "classifier_head", "head_inputs", "head_logits", "label_statistic",
           "resolve_statistic", "resolve_stopping", "resolve_trainable",
           "steps_to_next_check"]
