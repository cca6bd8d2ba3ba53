"""The tools layer: what runs TokenRing from the outside, built on the core.

* `tokenring.tools.cli`: the ``tokenring`` command (``backends``, ``run``,
  ``bench``, ``conformance``);
* `tokenring.tools.options`: argument types and the problem checks that
  ``run`` and ``bench`` share;
* `tokenring.tools.table`: plain-text tables;
* `tokenring.tools.benchmark`: ``tokenring bench``;
* `tokenring.tools.plan_command`: ``tokenring plan``;
* `tokenring.tools.conformance`: the runner of the shared conformance suite;
* `tokenring.tools.launch`: local multi-process worlds (`LocalWorld`);
* `tokenring.tools.netem`: emulated links between per-rank network namespaces;
* `tokenring.tools.problems`: random attention problems and how an answer
  is judged against float64;
* `tokenring.tools.tasks`: what the commands run on every rank, and tensors
  to and from bytes for the way back.

The core never imports this package, and these modules never import the
test package `tokenring.testing`, which builds on them (the conformance
runner only names the suite, for pytest to load); `tests/test_layers.py`
checks both.
"""
