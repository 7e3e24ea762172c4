"""Take docs/images/tensorboard_expert_load.png: headless Chromium against a TensorBoard on localhost.

TensorBoard's Time Series tab draws its cards only once they scroll into view and their data has
arrived, which ``chromium --screenshot --virtual-time-budget=...`` does not wait for (the cards stay
blank). This script drives the same headless Chromium over the DevTools protocol instead: it loads
the page, waits in real time, closes the settings pane, and captures the page. Usage::

    lightning-moe fit --config recipes/quickstart.yaml
    tensorboard --logdir lightning_logs --host 127.0.0.1 --port 6006 &
    python docs/images/screenshot.py --out docs/images/tensorboard_expert_load.png

The expert-migration picture (docs/images/tensorboard_migration.png)::

    lightning-moe fit --config recipes/expert_migration.yaml
    tensorboard --logdir lightning_logs --host 127.0.0.1 --port 6006 &
    python docs/images/screenshot.py --out docs/images/tensorboard_migration.png --width 1500 --height 1050 \
        --tags '^moe/(migration/(experts_moved|predicted_max_over_mean_before|predicted_max_over_mean_after)|layer0/placement)$' \
        --smoothing 0 --show-outliers --card-width 560 --wait 20

Needs ``chromium`` (Debian: ``apt-get install chromium``) and ``aiohttp``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import aiohttp

TAGS = r"^moe/(max_vio|max_vio_run|load_heatmap|layer1/tokens_per_expert|router_entropy)$"
CLOSE_SETTINGS = 'document.querySelector("button[aria-label=\\"Close side pane\\"]")?.click()'
#: TensorBoard keeps its display settings in the page's local storage under this key.
SETTINGS_KEY = "_tb_global_settings"


async def capture(
    websocket_url: str, url: str, out: str, width: int, height: int, wait: float, settings: dict | None = None
) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(websocket_url, max_msg_size=0) as socket:
        message_id = 0

        async def call(method: str, **params):
            nonlocal message_id
            message_id += 1
            await socket.send_json({"id": message_id, "method": method, "params": params})
            async for message in socket:
                reply = json.loads(message.data)
                if reply.get("id") == message_id:
                    return reply

        await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        await call("Page.navigate", url=url)
        if settings:
            # Settings live in the page's storage: write them on the page, then reload it (navigating
            # to the same address again would only change the fragment, not reload).
            await asyncio.sleep(3)
            await call("Runtime.evaluate", expression=f"localStorage.setItem({json.dumps(SETTINGS_KEY)}, "
                                                      f"{json.dumps(json.dumps(settings))})")
            await call("Page.reload", ignoreCache=True)
        await asyncio.sleep(wait)
        await call("Runtime.evaluate", expression=CLOSE_SETTINGS)
        await asyncio.sleep(3)
        shot = await call("Page.captureScreenshot", format="png")
        with open(out, "wb") as file:
            file.write(base64.b64decode(shot["result"]["data"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/images/tensorboard_expert_load.png")
    parser.add_argument("--tensorboard", default="http://127.0.0.1:6006")
    parser.add_argument("--tags", default=TAGS, help="Time Series tag filter (a regular expression)")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--wait", type=float, default=15.0, help="seconds to let the cards render")
    parser.add_argument("--port", type=int, default=9229, help="Chromium's DevTools port")
    parser.add_argument("--smoothing", type=float, default=None, help="scalar smoothing (TensorBoard's default: 0.6)")
    parser.add_argument("--show-outliers", action="store_true", help="do not clip the y axes to ignore outliers")
    parser.add_argument("--card-width", type=int, default=None, help="minimum width of a card, in pixels")
    args = parser.parse_args()

    url = f"{args.tensorboard}/?tagFilter={urllib.parse.quote(args.tags, safe='')}#timeseries"
    chromium = subprocess.Popen(
        [
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
            "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}", f"--window-size={args.width},{args.height}",
            f"--remote-debugging-port={args.port}", "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{args.port}/json"))
                break
            except OSError:
                time.sleep(0.3)
        else:
            raise RuntimeError(f"Chromium's DevTools did not answer on port {args.port}.")
        websocket_url = next(target["webSocketDebuggerUrl"] for target in targets if target["type"] == "page")
        settings = {}
        if args.smoothing is not None:
            settings["scalarSmoothing"] = args.smoothing
        if args.show_outliers:
            settings["ignoreOutliers"] = False
        if args.card_width is not None:
            settings["timeSeriesCardMinWidth"] = args.card_width
        asyncio.run(capture(websocket_url, url, args.out, args.width, args.height, args.wait, settings))
    finally:
        chromium.terminate()
        chromium.wait()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
