"""A slow, literal implementation of the published Forecast-MAE extraction rules, written from
FORECAST_MAE.md with av2's own per-segment helpers and a per-actor loop. Tests compare the fast
vectorised extractor against it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from av2.geometry.interpolate import compute_midpoint_line
from av2.map.map_api import ArgoverseStaticMap

TYPES = [
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
]
COMBINED = {"vehicle": 0, "bus": 0, "pedestrian": 1, "motorcyclist": 2, "cyclist": 2}
LANE = {"VEHICLE": 0, "BIKE": 1, "BUS": 2}


def reference_extract(scenario_dir: Path) -> dict:
    scenario_dir = Path(scenario_dir)
    df = pd.read_parquet(next(scenario_dir.glob("scenario_*.parquet")))
    static_map = ArgoverseStaticMap.from_json(next(scenario_dir.glob("log_map_archive_*.json")))
    steps = sorted(df["timestep"].unique())
    focal = df["focal_track_id"].iloc[0]
    now_df = df[df["timestep"] == steps[49]]
    focal_now = now_df[now_df["track_id"] == focal].iloc[0]
    origin = np.array([focal_now["position_x"], focal_now["position_y"]], np.float32)
    theta = np.float32(focal_now["heading"])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]], np.float32)

    ids = list(now_df["track_id"].unique())
    now_pos = now_df[["position_x", "position_y"]].to_numpy().astype(np.float32)
    ids = [t for i, t in enumerate(ids) if np.linalg.norm(now_pos[i] - origin) <= 150]
    ids.remove(focal)
    ids = [focal] + ids
    n = len(ids)
    pos = np.zeros((n, 110, 2), np.float32)
    head = np.zeros((n, 110), np.float32)
    vel = np.zeros((n, 110), np.float32)
    pad = np.ones((n, 110), bool)
    attr = np.zeros((n, 3), np.uint8)
    for tid, tdf in df[df["track_id"].isin(ids)].groupby("track_id"):
        i = ids.index(tid)
        st = [steps.index(s) for s in tdf["timestep"]]
        otype = tdf["object_type"].iloc[0]
        attr[i] = [TYPES.index(otype), tdf["object_category"].iloc[0], COMBINED.get(otype, 3)]
        pad[i, st] = False
        if pad[i, 49] or TYPES.index(otype) >= 5:
            pad[i, 50:] = True
        xy = tdf[["position_x", "position_y"]].to_numpy().astype(np.float32)
        pos[i, st] = (xy - origin) @ rot
        h = tdf["heading"].to_numpy().astype(np.float32)
        head[i, st] = (h - theta + np.float32(np.pi)) % np.float32(2 * np.pi) - np.float32(np.pi)
        vel[i, st] = np.linalg.norm(tdf[["velocity_x", "velocity_y"]].to_numpy().astype(np.float32), axis=1)

    lanes, inter, lattr = [], [], []
    for seg in static_map.get_nearby_lane_segments(origin, 150):
        centre, width = compute_midpoint_line(seg.left_lane_boundary.xyz, seg.right_lane_boundary.xyz, 20)
        lanes.append((centre[:, :2].astype(np.float32) - origin) @ rot)
        inter.append(float(seg.is_intersection))
        lattr.append([LANE[seg.lane_type.value], width, float(seg.is_intersection)])
    lanes = np.stack(lanes)
    ctr = lanes[:, 9:11].mean(axis=1)
    ang = np.arctan2(lanes[:, 10, 1] - lanes[:, 9, 1], lanes[:, 10, 0] - lanes[:, 9, 0])
    lpad = (np.abs(lanes) > 150).any(-1)
    keep = ~lpad.all(-1)
    lanes = np.where(lpad[..., None], 0, lanes)[keep]
    lane_out = {
        "lane_positions": lanes,
        "lane_centers": ctr[keep],
        "lane_angles": ang[keep],
        "lane_attr": np.array(lattr, np.float32)[keep],
        "lane_padding_mask": lpad[keep],
        "is_intersections": np.array(inter, np.float32)[keep],
    }
    dist = np.linalg.norm(pos[:, None, 49] - lanes.reshape(1, -1, 2), axis=-1).min(axis=1)
    ok = dist < 5
    ok[0] = True
    pos, head, vel, pad, attr = pos[ok], head[ok], vel[ok], pad[ok], attr[ok]
    n = len(pos)
    x = np.zeros((n, 50, 2), np.float32)
    y = np.zeros((n, 60, 2), np.float32)
    dv = np.zeros((n, 50), np.float32)
    for a in range(n):
        for t in range(1, 50):
            if not (pad[a, t] or pad[a, t - 1]):
                x[a, t] = pos[a, t] - pos[a, t - 1]
                dv[a, t] = vel[a, t] - vel[a, t - 1]
        for t in range(50, 110):
            if not (pad[a, t] or pad[a, 49]):
                y[a, t - 50] = pos[a, t] - pos[a, 49]
    return {
        "x": x,
        "y": y,
        "x_attr": attr,
        "x_positions": pos[:, :50],
        "x_centers": pos[:, 49],
        "x_angles": head,
        "x_velocity": vel,
        "x_velocity_diff": dv,
        "x_padding_mask": pad,
        **lane_out,
        "origin": origin[None],
        "theta": theta,
        "scenario_id": df["scenario_id"].iloc[0],
        "track_id": focal,
        "city": df["city"].iloc[0],
    }
