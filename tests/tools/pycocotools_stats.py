"""Print pycocotools' 12 bbox stats as JSON for an annotation file and a
COCO results file. The Rust test `eval_matches_pycocotools` compares them
with `nanodetd eval` on the same detections."""
import contextlib
import io
import json
import sys

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

annotations, detections = sys.argv[1], sys.argv[2]
with contextlib.redirect_stdout(io.StringIO()):
    truth = COCO(annotations)
    results = truth.loadRes(detections)
    ev = COCOeval(truth, results, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
print(json.dumps([float(v) for v in ev.stats]))
