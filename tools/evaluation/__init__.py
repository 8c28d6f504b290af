"""The evaluation stage: accuracy of the served pipeline. ``make eval`` (WIDER FACE protocol on
a WIDER-format folder), ``make eval-selfie`` (AP on the labelled crowd photo) and ``make parity``
(backends compared face by face)."""
