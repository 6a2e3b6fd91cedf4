"""Class names, COCO category ids and the VOC colour palette (spec 7.3).

Class id convention: mask value 0 is background, 255 is ignore, and class `k` of the lists below
(0-based) is mask value `k + 1` and CAM / multi-hot channel `k`.
"""
import numpy as np

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# The 80 COCO "thing" categories in the standard order of `instances_*.json`.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

# `category_id` of each entry of COCO_CLASSES in the instances JSON (1..90 with 10 gaps).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90,
)

# COCO `category_id` -> contiguous mask class id 1..80.
COCO_CATEGORY_TO_CLASS_ID = {
    category_id: class_index + 1 for class_index, category_id in enumerate(COCO_CATEGORY_IDS)
}

CLASS_NAMES = {"voc": VOC_CLASSES, "coco": COCO_CLASSES}


def class_names(dataset):
  """The foreground class names of `dataset` ("voc" or "coco")."""
  if dataset not in CLASS_NAMES:
    raise ValueError(f"Unknown dataset {dataset!r}; expected one of {sorted(CLASS_NAMES)}.")
  return CLASS_NAMES[dataset]


def color_palette(num_entries=256):
  """The PASCAL VOC colour map: uint8 [num_entries, 3] RGB.

  Entry `i` spreads the bits of `i` over the three channels, most significant bit first:
  bit 3j of `i` sets bit 7-j of red, bit 3j+1 of green and bit 3j+2 of blue. Entry 0 is
  black, 255 (ignore) is (224, 224, 192). Used for both VOC and COCO palette PNGs.
  """
  index = np.arange(num_entries, dtype=np.int64)
  palette = np.zeros((num_entries, 3), np.int64)
  for bit_group in range(8):
    group = index >> (3 * bit_group)
    for channel in range(3):
      palette[:, channel] |= ((group >> channel) & 1) << (7 - bit_group)
  return palette.astype(np.uint8)
