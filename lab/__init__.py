"""The lab: benchmarks and test hosts, in the checkout only (never installed)."""
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
"""The checkout the lab sits in: where `python3 -m lab...` runs from, and where tests/testdata is.
It holds no tcpinfo/ (the package is under src/), so the installed package is what is imported."""
