"""Writes engine_state_<commit>_<strategy>.json: the state `tests/engine_drive.py` leaves after 5 steps, saved by the
engine of the checkout on PYTHONPATH. Run from a checkout of an older commit to make a fixture of its form:

    git archive <commit> mpopt_hf | tar -x -C /tmp/old && \\
        PYTHONPATH=/tmp/old:tests python tests/data/make_engine_state_fixtures.py <commit>
"""

import json
import os
import sys

from engine_drive import drive, fresh, start

commit = sys.argv[1]
for strategy in ("race", "ucb"):
    engine = fresh(strategy)
    start(engine)
    drive(engine, range(1, 6))  # mid-race: two trials ended, the third running
    state = engine.state_dict()
    for d in state["decisions"]:
        d["wall_time"] = 0.0  # not compared, and not worth keeping
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"engine_state_{commit}_{strategy}.json")
    with open(path, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    print(path)
