"""The lossy comparison behind ``bench/planner_vs_fixed.py`` (and ``bench/lossy_large.py``): wfactor's planner
against single fixed codecs, bytes against the worst logit cosine over the fixed eval texts.

Not bench scripts (``bench/run.py`` runs only ``bench/*.py``), one job each:

- ``setup``: what to run on which family (``Setup``, the fixture's sweep) and what a run collected (``Run``);
- ``points``: one measured point (``Point``) and the keys the comparisons sort points by;
- ``planner``: one ``wfactor.factor`` run at one budget, rebuilt, evaluated and counted;
- ``fixed_codecs``: the fixed-codec baselines (quant, low rank, sparse, BitDelta-style, DARE-style);
- ``sweeps``: the planner's budget sweep and the fixed codecs' settings sweep, each point evaluated;
- ``compare``: which planner point beats which fixed setting (the acceptance and issue 7's goal);
- ``plot``: the size vs cosine figure;
- ``report`` and ``report_default``: the markdown sections (and the verdict figures added to the JSON).

The cosine on real inputs is ``common.Evaluator`` (shared with the other bench scripts).
"""
