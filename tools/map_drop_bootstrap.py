"""How far a mAP drop on a small set can be trusted: a paired bootstrap.

usage: python3 tools/map_drop_bootstrap.py ANNOTATIONS.json FP32.json INT8.json
           [INT8.json ...] [--resamples N] [--seed S]

FP32.json and each INT8.json are COCO results files from the same images
(`nanodetd eval --save-detections FILE`). Each resample draws the images
with replacement; every model is scored on that same draw with
pycocotools (bbox AP at IoU 0.50:0.95), and each drop FP32 − INT8 is kept.
With several INT8 files, each one after the first is also compared with
the first on the same draws: the difference of their drops.
An image drawn twice counts twice: it is copied under a new id, with its
annotations and every model's detections, because COCOeval would otherwise
merge repeated ids.

Prints each drop on the whole set, then the resamples' mean, standard
deviation and 90 % interval (5th and 95th percentiles), in mAP points.
Needs numpy and pycocotools.
"""
import argparse
import contextlib
import io
import json

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def score(truth, detections):
    """bbox mAP (IoU 0.50:0.95) of `detections` against the `truth` dict."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        if not detections:
            return 0.0
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def drawn(truth, images, anns, by_image, draw):
    """The truth dict and each model's detections for the images in `draw`
    (original ids, repeats allowed), each copy under a new image id.
    `images` and `anns` index `truth` by image id."""
    new_images, new_anns = [], []
    new_dets = [[] for _ in by_image]
    for new_id, old_id in enumerate(draw, start=1):
        new_images.append(dict(images[old_id], id=new_id))
        for a in anns.get(old_id, []):
            new_anns.append(dict(a, id=len(new_anns) + 1, image_id=new_id))
        for out, dets in zip(new_dets, by_image):
            out.extend(dict(d, image_id=new_id) for d in dets.get(old_id, []))
    new_truth = dict(truth, images=new_images, annotations=new_anns)
    return new_truth, new_dets


def stats(name, values):
    values = np.array(values)
    low, high = np.percentile(values, [5, 95])
    print(f"{name}: mean {values.mean():.2f}, sd {values.std(ddof=1):.2f}, "
          f"90 % interval [{low:.2f}, {high:.2f}] points")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("annotations")
    parser.add_argument("fp32")
    parser.add_argument("int8", nargs="+")
    parser.add_argument("--resamples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    truth = json.load(open(args.annotations))
    by_image = []
    for path in [args.fp32] + args.int8:
        dets = {}
        for d in json.load(open(path)):
            d.pop("id", None)
            dets.setdefault(d["image_id"], []).append(d)
        by_image.append(dets)
    whole = [score(truth, [dict(d) for dets in m.values() for d in dets]) for m in by_image]
    print(f"FP32 {whole[0]:.4f}")
    for path, value in zip(args.int8, whole[1:]):
        print(f"{path}: INT8 {value:.4f}, drop {100 * (whole[0] - value):.2f} points")
    ids = [im["id"] for im in truth["images"]]
    # Indexed once: every resample draws from the same set.
    images = {im["id"]: im for im in truth["images"]}
    anns = {}
    for a in truth["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    rng = np.random.default_rng(args.seed)
    drops = [[] for _ in args.int8]
    for _ in range(args.resamples):
        draw = list(rng.choice(ids, size=len(ids), replace=True))
        t, dets = drawn(truth, images, anns, by_image, draw)
        scores = [score(t, d) for d in dets]
        for out, value in zip(drops, scores[1:]):
            out.append(100 * (scores[0] - value))
    print(f"{args.resamples} resamples (seed {args.seed}):")
    for path, d in zip(args.int8, drops):
        stats(f"  drop of {path}", d)
    for path, d in zip(args.int8[1:], drops[1:]):
        stats(f"  {path} minus {args.int8[0]}", np.array(d) - np.array(drops[0]))


if __name__ == "__main__":
    main()
