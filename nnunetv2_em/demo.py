"""``nnunetv2_em demo``: the EM loop end to end on 30 real Hippocampus MRI cases, on a CPU, in minutes."""

from __future__ import annotations

import os

DEMO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data", "hippocampus")
