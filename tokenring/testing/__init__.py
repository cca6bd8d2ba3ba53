"""The test package: the conformance suite (a pytest plugin any backend runs), its checks and multi-rank tasks.

It builds on the tools (`tokenring.tools.problems`, `tokenring.tools.tasks`,
`tokenring.tools.launch`); no module of the core, the kit or the tools imports it.
"""
