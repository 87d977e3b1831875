"""The one home of the numbers of the Argoverse 2 single-agent task."""

import math

HZ = 10
HISTORY_STEPS = 50  # steps 0..49 are observed; the last one is "now"
FUTURE_STEPS = 60  # steps 50..109 are predicted (6 s)
TOTAL_STEPS = HISTORY_STEPS + FUTURE_STEPS
CURRENT_STEP = HISTORY_STEPS - 1

RADIUS_M = 150.0  # actors within this L2 distance, lanes within this L-inf box
LANE_POINTS = 20  # points per interpolated lane centreline
OUTLIER_LANE_DIST_M = 5.0  # a non-focal actor this far from every lane point is dropped
NUM_MODES = 6
MISS_THRESHOLD_M = 2.0

# AV2 object types in the order of av2's ObjectType enum.
OBJECT_TYPES = (
    "vehicle",
    "pedestrian",
    "motorcyclist",
    "cyclist",
    "bus",
    "static",
    "background",
    "construction",
    "riderless_bicycle",
    "unknown",
)
OBJECT_TYPE_INDEX = {name: i for i, name in enumerate(OBJECT_TYPES)}
# per-scenario report column: the focal agent's object type (a name of OBJECT_TYPES)
FOCAL_TYPE = "focal_type"
# per-scenario report column: what the focal agent does over the 6 s of its ground truth
# (``evaluation.focal_manoeuvres``): it stays within MISS_THRESHOLD_M of where it is (stationary),
# or turns by more than TURN_RAD (its heading at the end against now; + left), or goes straight
MANOEUVRE = "manoeuvre"
MANOEUVRES = ("straight", "stationary", "left turn", "right turn")
TURN_RAD = math.radians(45.0)
# per-scenario report column: the scenario's city (AV2's austin, dearborn, miami, palo-alto,
# pittsburgh, washington-dc)
CITY = "city"
# vehicle/bus 0, pedestrian 1, motorcyclist/cyclist 2, everything else 3
COMBINED_TYPE = {"vehicle": 0, "bus": 0, "pedestrian": 1, "motorcyclist": 2, "cyclist": 2}
NUM_COMBINED_TYPES = 4
# Types whose future is never a target (the published extractor pads it).
NO_FUTURE_TYPES = frozenset({"static", "background", "construction", "riderless_bicycle", "unknown"})

LANE_TYPES = ("VEHICLE", "BIKE", "BUS")
LANE_TYPE_INDEX = {name: i for i, name in enumerate(LANE_TYPES)}

# Track categories of the AV2 format.
TRACK_FRAGMENT, UNSCORED_TRACK, SCORED_TRACK, FOCAL_TRACK = 0, 1, 2, 3

SPLITS = ("train", "val", "test")

# Metric names: one spelling everywhere.
METRICS = ("minADE1", "minFDE1", "minADE6", "minFDE6", "MR6", "brier-minFDE6")
# per scene, beside the metrics (per_scenario.csv): the mode the K=1 metrics score (the most
# probable) with its probability, and the mode the K=6 metrics score (the smallest endpoint error)
MODE_COLUMNS = ("top_mode", "top_prob", "best_mode")
# minFDE6 at the earlier horizons, 1-5 s ahead (at 6 s it is minFDE6), each as if the forecast
# ended there: the smallest error over the modes at that step (per_scenario.csv, report.json's
# by_horizon); errors grow with the horizon, and two models may part at 1 s or only at 6 s
HORIZONS_S = (1, 2, 3, 4, 5)
HORIZON_COLUMNS = tuple(f"minFDE6_{t}s" for t in HORIZONS_S)
MONITOR = "val/minFDE6"
