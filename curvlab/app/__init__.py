"""The application built on the library: data sets, built-in models, the ``curvlab`` command
line, the training loop with its probes, and the report (summary and figures).

The library (:mod:`curvlab.extract`, :mod:`curvlab.approx`, :mod:`curvlab.compare`,
:mod:`curvlab.optim`, :mod:`curvlab.block`, :mod:`curvlab.stats`, :mod:`curvlab.sqrt`,
:mod:`curvlab.io`) never imports this package (tested).
"""
