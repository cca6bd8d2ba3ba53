"""The tools layer: what runs TokenRing from the outside, built on the core.

* `tokenring.tools.cli`: the ``tokenring`` command (``backends``, ``run``,
  ``bench``, ``conformance``);
* `tokenring.tools.benchmark`: ``tokenring bench``;
* `tokenring.tools.conformance`: the runner of the shared conformance suite;
* `tokenring.tools.launch`: local multi-process worlds (`LocalWorld`);
* `tokenring.tools.netem`: emulated links between per-rank network namespaces.
"""
