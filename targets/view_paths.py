"""Where a run cuts its views: the two view paths both stages choose between.

    pillow   the data-loader workers run `targets.views.apply_view` (the exact reference)
    device   the workers decode (and crop); `targets.device_views.DeviceViews` cuts the views batched
             on the run's device, bit-identical with the Pillow path
    auto     device when that device is a GPU and the settings are ones the device path reproduces
"""

from __future__ import annotations

import torch

from cae2.errors import UserError
from targets.device_views import check_supported
from targets.views import ViewSettings

VIEW_PATHS = ("auto", "pillow", "device")


def resolve_view_path(choice: str, device: torch.device, interpolation: str, settings: ViewSettings) -> str:
    """'auto' -> 'device' on a GPU when the device path reproduces these settings, else 'pillow'."""
    if choice == "pillow" or (choice == "auto" and device.type != "cuda"):
        return "pillow"
    try:
        check_supported(interpolation, settings.hue)
    except ValueError as e:
        if choice == "device":
            raise UserError(f"--view-path device: {e}") from None
        return "pillow"
    return "device"


def where_views_are_cut(view_path: str, device: torch.device | str) -> str:
    return f"on {device} (device view path)" if view_path == "device" else "by Pillow on the host (Pillow view path)"
