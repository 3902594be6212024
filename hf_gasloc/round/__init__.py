"""One outer step: a fragment's two phases (``fragment.py``), its outer rule (``outer.py``,
defaults in ``outer_defaults.py``), when each fragment starts and lands (``scheduler.py``),
non-finite containment (``health.py``), the workers' average (``consensus.py``), the hook on
the inner optimizer (``inner.py``) and what a round reports (``metrics.py``)."""
