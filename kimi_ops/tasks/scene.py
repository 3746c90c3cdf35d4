"""scene: acoustic scene, CochlScene's 13 labels (default) or TUT2017's 15 (`scene:tut2017`)."""

from __future__ import annotations

from kimi_ops.tasks.base import ChoiceTask

QUESTION = "Identify the acoustic scene in the audio."
LABEL_SETS = {
    "cochlscene": ("bus", "cafe", "car", "crowdedindoor", "elevator", "kitchen", "park",
                   "residentialarea", "restaurant", "restroom", "street", "subway",
                   "subwaystation"),
    "tut2017": ("beach", "bus", "cafe/restaurant", "car", "city_center", "forest_path",
                "grocery_store", "home", "library", "metro_station", "office", "park",
                "residential_area", "train", "tram"),
}
# TUT2017 options are shown in the prompt the way the evaluation writes them
TUT2017_DISPLAY = ("beach", "bus", "cafe or restaurant", "car", "city center", "forest path",
                   "grocery store", "home", "library", "metro station", "office", "park",
                   "residential area", "train", "tram")


def make(label_set: str = "cochlscene") -> ChoiceTask:
    if label_set not in LABEL_SETS:
        raise ValueError(f"scene: label set must be one of {sorted(LABEL_SETS)}")
    display = TUT2017_DISPLAY if label_set == "tut2017" else None
    return ChoiceTask(name="scene", version=f"scene-1-{label_set}", question=QUESTION,
                      labels=LABEL_SETS[label_set], display=display)
