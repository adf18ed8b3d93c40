"""`lvd demo-corpus`: a small, deterministic web corpus served from 127.0.0.1.

Built only from photos that ship inside installed packages (scikit-image's data folder and
scikit-learn's sample images) plus numpy-generated images, so nothing is downloaded. The corpus
has everything the curation pipeline must handle: near-duplicate families, exact duplicates
under different URLs, photo families (corner views that every dedup keeps and that clusters and
retrievals should group with their photo; mirrored / rotated copies that only copy detection
catches), bad URLs (404, HTML under a .jpg name, a truncated JPEG), robots.txt
disallowed files, a URL list with a repeated line, a WARC with HTML pages and image records,
a curated folder and an ImageFolder-style eval set. ``manifest.json`` records the ground truth.

Layout of ``out``::

    site/            files served by :func:`serve_demo_corpus` (robots.txt disallows /private/)
    urls.txt         the URL list (base_url + paths)
    pages.warc.gz    HTML page and image response records
    curated/         curated source: the family photos (their uncurated views are what retrieval finds)
    eval/<class>/    evaluation images (ImageFolder layout; copies of two non-family photos)
    labelled/{train,val}/<class>/   a small labelled set for kNN / linear probes (class = source photo)
    manifest.json    what was built and the expected ground truth
    access.log       appended by the server, one line per request
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MANIFEST_VERSION = 3
DEFAULT_BASE_URL = "http://127.0.0.1:8765"
MANAGED_DIRS = ("site", "curated", "eval", "labelled")
PHOTO_MAX_SIDE = 512

# (name, package, file) in preference order; only those present on disk are used.
PHOTO_CANDIDATES = [
    ("astronaut", "skimage", "astronaut.png"),
    ("coffee", "skimage", "coffee.png"),
    ("chelsea", "skimage", "chelsea.png"),
    ("rocket", "skimage", "rocket.jpg"),
    ("china", "sklearn", "china.jpg"),
    ("flower", "sklearn", "flower.jpg"),
    ("motorcycle", "skimage", "motorcycle_left.png"),
    ("hubble", "skimage", "hubble_deep_field.jpg"),
    ("retina", "skimage", "retina.jpg"),
    ("ihc", "skimage", "ihc.png"),
    ("camera", "skimage", "camera.png"),
    ("moon", "skimage", "moon.png"),
    ("coins", "skimage", "coins.png"),
    ("brick", "skimage", "brick.png"),
    ("grass", "skimage", "grass.png"),
    ("gravel", "skimage", "gravel.png"),
    ("page", "skimage", "page.png"),
    ("text", "skimage", "text.png"),
    ("cell", "skimage", "cell.png"),
    ("clock", "skimage", "clock_motion.png"),
]
NEAR_DUP_PHOTOS = 6
EXACT_DUP_PHOTOS = 4
# Scene photos with distinct parts: each gets "views" (crops of a different corner, kept by every
# dedup stage: what clusters and retrievals should group with the photo) and "copies" (a mirrored
# and a rotated re-encode that the PCA hash misses: copy_dedup removes them). The curated set is
# these photos, so each curated query has its own derived images to retrieve.
FAMILY_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "china", "motorcycle", "camera", "ihc")
VIEW_FRACTION = 0.5  # side of a view relative to the photo: the four quadrants
VIEW_CORNERS = {"tl": (0.0, 0.0), "tr": (1.0, 0.0), "bl": (0.0, 1.0), "br": (1.0, 1.0)}
VIEW_MAX_SIDE = 320
EVAL_PHOTOS = {"flower": "flower", "coins": "coin"}  # photo → eval class (not family photos: see _add_eval)

CONTENT_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
    ".webp": "image/webp", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
    ".html": "text/html; charset=utf-8", ".txt": "text/plain; charset=utf-8", ".json": "application/json",
}


@dataclass
class DemoCorpus:
    root: Path
    site: Path
    urls: Path
    warc: Path
    curated: Path
    eval: Path
    base_url: str
    manifest: Path

    @classmethod
    def at(cls, root: Path, base_url: str) -> "DemoCorpus":
        root = Path(root)
        return cls(root=root, site=root / "site", urls=root / "urls.txt", warc=root / "pages.warc.gz",
                   curated=root / "curated", eval=root / "eval", base_url=base_url,
                   manifest=root / "manifest.json")


@dataclass
class _Plan:
    """Everything to write (relative path → bytes) and the ground truth gathered on the way."""

    base_url: str
    files: dict[str, bytes] = field(default_factory=dict)
    url_lines: list[str] = field(default_factory=list)
    truth: dict = field(default_factory=lambda: {
        "near_duplicate_families": {}, "generated": [], "bad": [], "robots_disallowed": [],
        "warc_page_only": [], "eval_copies": {}, "photo_origins": {}, "families": {}, "derived_from": {},
        "copy_of": {}})
    warc_images: list[dict] = field(default_factory=list)  # uri, status, content_type, body

    def url(self, site_path: str) -> str:
        return f"{self.base_url}/{site_path}"

    def add_site(self, site_path: str, data: bytes, listed: bool = True, photo: str | None = None,
                 copy: bool = False) -> str:
        """Serve ``data`` at ``site_path`` (in urls.txt when ``listed``). ``photo``: the photo it shows
        (truth ``derived_from``); ``copy``: it is a copy of that photo (truth ``copy_of``: a re-encode,
        resize, small crop, mirror or rotation, which deduplication should collapse to one image)."""
        self.files[f"site/{site_path}"] = data
        if listed:
            self.url_lines.append(self.url(site_path))
        if photo is not None:
            self.truth["derived_from"][self.url(site_path)] = photo
            if copy:
                self.truth["copy_of"][self.url(site_path)] = photo
        return self.url(site_path)


# --------------------------------------------------------------------------- image sources


def _package_dir(package: str) -> Path | None:
    try:
        if package == "skimage":
            import skimage

            return Path(skimage.__file__).parent / "data"
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images"
    except ImportError:
        return None


def _normalise_mode(img: Image.Image) -> Image.Image:
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, (255, 255, 255))
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")


def _fit(img: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(img.size)
    if scale >= 1:
        return img
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.LANCZOS)


def load_photos() -> list[tuple[str, str, Image.Image]]:
    """(name, origin label, image ≤ PHOTO_MAX_SIDE) for every candidate photo present on disk."""
    photos = []
    for name, package, filename in PHOTO_CANDIDATES:
        folder = _package_dir(package)
        if folder is None or not (folder / filename).is_file():
            continue
        with Image.open(folder / filename) as img:
            img.load()
            photos.append((name, f"{package}:{filename}", _fit(_normalise_mode(img), PHOTO_MAX_SIDE)))
    if len(photos) < NEAR_DUP_PHOTOS:
        raise RuntimeError("too few sample photos found in scikit-image/scikit-learn; is the venv complete?")
    return photos


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality, optimize=False, progressive=False)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=quality, method=4)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------- derived images


def _crop(img: Image.Image, frac: float) -> Image.Image:
    dx, dy = round(img.width * frac), round(img.height * frac)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


def _brighten(img: Image.Image, delta: int) -> Image.Image:
    arr = np.asarray(img).astype(np.int16) + delta
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode=img.mode)


def _half(img: Image.Image) -> Image.Image:
    return img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.LANCZOS)


NEAR_DUP_VARIANTS: dict[str, Callable[[Image.Image], tuple[Image.Image, int]]] = {
    "q30": lambda im: (im, 30),
    "q70": lambda im: (im, 70),
    "half": lambda im: (_half(im), 90),
    "crop": lambda im: (_crop(im, 0.06), 90),
    "bright": lambda im: (_brighten(im, 30), 90),
}


def _gradient(rng: np.random.Generator, size: int, kind: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    if kind % 4 == 3:
        t = np.clip(np.hypot(x - 0.5, y - 0.5) / 0.71, 0, 1)
    else:
        angle = rng.uniform(0, np.pi)
        t = (x * np.cos(angle) + y * np.sin(angle) + 1) / 3
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    arr = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    return Image.fromarray(arr.round().astype(np.uint8), "RGB")


def _shapes(rng: np.random.Generator, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = (int(v) for v in rng.integers(0, size - 20, 2))
        w, h = (int(v) for v in rng.integers(15, size // 2, 2))
        box = (x0, y0, min(size - 1, x0 + w), min(size - 1, y0 + h))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour)
    return img


def _noise(rng: np.random.Generator, size: int, kind: int) -> Image.Image:
    if kind == 0:
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    cells = 4 + 4 * kind
    small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))


def generated_images(seed: int = 142, size: int = 192) -> list[tuple[str, str, Image.Image]]:
    """(file name, PIL format, image): 8 gradients, 8 shape scenes, 8 noise textures."""
    rng = np.random.default_rng(seed)
    shape_formats = ["PNG"] * 5 + ["GIF", "WEBP", "BMP"]
    exts = {"PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "JPEG": "jpg"}
    out = [(f"gradient-{i:02d}.png", "PNG", _gradient(rng, size, i)) for i in range(8)]
    out += [(f"shapes-{i:02d}.{exts[f]}", f, _shapes(rng, size)) for i, f in enumerate(shape_formats)]
    out += [(f"noise-{i:02d}.jpg", "JPEG", _noise(rng, size, i)) for i in range(8)]
    return out


# --------------------------------------------------------------------------- site


def _add_photos(plan: _Plan, photos) -> dict[str, bytes]:
    originals = {}
    for name, origin, img in photos:
        data = encode(img, "JPEG", 90)
        originals[name] = data
        plan.add_site(f"photos/{name}.jpg", data, photo=name)
        plan.truth["photo_origins"][plan.url(f"photos/{name}.jpg")] = origin
    return originals


def _add_near_dups(plan: _Plan, photos) -> None:
    for name, _, img in photos[:NEAR_DUP_PHOTOS]:
        family = [plan.url(f"photos/{name}.jpg")]
        for variant, make in NEAR_DUP_VARIANTS.items():
            derived, quality = make(img)
            family.append(plan.add_site(f"near/{name}-{variant}.jpg", encode(derived, "JPEG", quality), photo=name,
                                        copy=True))
        plan.truth["near_duplicate_families"][name] = family


def _corner(img: Image.Image, fx: float, fy: float, frac: float) -> Image.Image:
    w, h = round(img.width * frac), round(img.height * frac)
    x, y = round((img.width - w) * fx), round((img.height - h) * fy)
    return img.crop((x, y, x + w, y + h))


COPY_VARIANTS: dict[str, Callable[[Image.Image], tuple[Image.Image, int]]] = {
    "mirror": lambda im: (_fit(im.transpose(Image.FLIP_LEFT_RIGHT), round(max(im.size) * 0.85)), 75),
    "rotated": lambda im: (im.convert("RGB").rotate(6, resample=Image.BICUBIC, fillcolor=(128, 128, 128)), 80),
}


def _family_photos(photos) -> list[tuple[str, str, Image.Image]]:
    """The FAMILY_PHOTOS present on disk, in FAMILY_PHOTOS order."""
    by_name = {p[0]: p for p in photos}
    return [by_name[name] for name in FAMILY_PHOTOS if name in by_name]


def _add_families(plan: _Plan, photos) -> None:
    """Views (kept) and copies (removed by copy_dedup) of each family photo; truth maps URL → photo."""
    for name, _, img in _family_photos(photos):
        views = [plan.add_site(f"views/{name}-{pos}.jpg",
                               encode(_fit(_corner(img, fx, fy, VIEW_FRACTION), VIEW_MAX_SIDE).convert("RGB"), "JPEG", 85),
                               photo=name)
                 for pos, (fx, fy) in VIEW_CORNERS.items()]
        copies = []
        for variant, make in COPY_VARIANTS.items():
            derived, quality = make(img)
            copies.append(plan.add_site(f"copies/{name}-{variant}.jpg", encode(derived.convert("RGB"), "JPEG", quality),
                                        photo=name, copy=True))
        plan.truth["families"][name] = {"original": plan.url(f"photos/{name}.jpg"), "views": views, "copies": copies}


def _add_mirrors(plan: _Plan, photos, originals: dict[str, bytes]) -> None:
    for name, _, _ in photos[NEAR_DUP_PHOTOS:NEAR_DUP_PHOTOS + EXACT_DUP_PHOTOS]:
        plan.add_site(f"mirror/{name}-copy.jpg", originals[name], photo=name, copy=True)


def _add_generated(plan: _Plan) -> dict[str, bytes]:
    generated = {}
    for filename, fmt, img in generated_images():
        data = encode(img, fmt, 85)
        generated[filename] = data
        plan.truth["generated"].append(plan.add_site(f"gen/{filename}", data))
    return generated


def _add_private(plan: _Plan, photos, generated: dict[str, bytes]) -> None:
    name, _, img = photos[-1]
    urls = [plan.add_site("private/secret-1.jpg", encode(_crop(img, 0.1), "JPEG", 80), photo=name),
            plan.add_site("private/secret-2.png", generated["gradient-00.png"])]
    plan.truth["robots_disallowed"] = urls
    for url in urls:
        plan.truth["bad"].append({"url": url, "reason": "robots_disallowed", "expect": "skipped, never requested"})


SOFT_404_HTML = (b"<!DOCTYPE html>\n<html><head><title>Not found</title></head>"
                 b"<body><h1>Sorry, this picture has moved.</h1></body></html>\n")


def _add_bad(plan: _Plan, originals: dict[str, bytes]) -> None:
    truncated = next(iter(originals.values()))
    bad = [
        (plan.url("missing/does-not-exist.jpg"), "not_found", "HTTP 404"),
        (plan.add_site("bad/soft-404.jpg", SOFT_404_HTML, listed=False), "not_an_image",
         "HTTP 200 with Content-Type text/html under a .jpg name"),
        (plan.add_site("bad/truncated.jpg", truncated[: len(truncated) * 2 // 5], listed=False),
         "truncated_image", "HTTP 200 image/jpeg whose data ends early"),
    ]
    for url, reason, expect in bad:
        plan.url_lines.append(url)
        plan.truth["bad"].append({"url": url, "reason": reason, "expect": expect})


ROBOTS_TXT = b"User-agent: *\nDisallow: /private/\n"


def _tiny_png_data_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(encode(Image.new("RGB", (2, 2), (255, 0, 0)), "PNG")).decode()


def _gallery_pages(plan: _Plan, photos, extra: list[str]) -> dict[str, str]:
    first = photos[0][0]
    page1 = (
        "<!DOCTYPE html>\n<html><head><title>Gallery 1</title></head><body>\n"
        f'<img src="{plan.url(f"photos/{first}.jpg")}" alt="absolute">\n'
        '<img src="../gen/gradient-00.png" alt="relative">\n'
        f'<img src="/extra/{extra[0]}" alt="root-relative">\n'
        f'<img src="{_tiny_png_data_uri()}" alt="inline, skipped">\n'
        "</body></html>\n"
    )
    page2 = (
        "<!DOCTYPE html>\n<html><head><title>Gallery 2</title><base href=\"/near/\"></head><body>\n"
        f'<img src="{first}-q30.jpg" alt="relative to base">\n'
        f'<img src="../extra/{extra[1]}" alt="relative to base">\n'
        f'<IMG SRC="{plan.url("extra/" + extra[2])}" alt="absolute">\n'
        "</body></html>\n"
    )
    return {"pages/gallery-1.html": page1, "pages/gallery-2.html": page2}


def _page_image_urls(plan: _Plan, photos, extra: list[str]) -> list[str]:
    first = photos[0][0]
    return [plan.url(f"photos/{first}.jpg"), plan.url("gen/gradient-00.png"), plan.url(f"extra/{extra[0]}"),
            plan.url(f"near/{first}-q30.jpg"), plan.url(f"extra/{extra[1]}"), plan.url(f"extra/{extra[2]}")]


def _add_extra_and_pages(plan: _Plan, photos) -> dict[str, str]:
    sources = photos[NEAR_DUP_PHOTOS + EXACT_DUP_PHOTOS:NEAR_DUP_PHOTOS + EXACT_DUP_PHOTOS + 3] or photos[-3:]
    extra = []
    for name, _, img in sources:
        filename = f"{name}-wide.jpg"
        plan.add_site(f"extra/{filename}", encode(img.transpose(Image.FLIP_LEFT_RIGHT), "JPEG", 88), listed=False,
                      photo=name, copy=True)
        extra.append(filename)
        plan.truth["warc_page_only"].append(plan.url(f"extra/{filename}"))
    pages = _gallery_pages(plan, photos, extra)
    for path, html in pages.items():
        plan.add_site(path, html.encode("utf-8"), listed=False)
    index = "".join(f'<li><a href="/{p}">{p}</a></li>\n' for p in pages)
    plan.add_site("index.html", f"<!DOCTYPE html>\n<html><body><ul>\n{index}</ul></body></html>\n".encode(), False)
    plan.add_site("robots.txt", ROBOTS_TXT, listed=False)
    return pages


# --------------------------------------------------------------------------- WARC


def _warc_headers(uri: str, record_type: str, n: int) -> dict[str, str]:
    rid = uuid.uuid5(uuid.NAMESPACE_URL, f"{record_type}:{n}:{uri}")
    return {"WARC-Record-ID": f"<urn:uuid:{rid}>", "WARC-Date": f"2024-01-01T00:00:{n:02d}Z"}


def _http_response(writer, uri: str, n: int, status: str, content_type: str, body: bytes):
    from warcio.statusandheaders import StatusAndHeaders

    headers = StatusAndHeaders(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))],
                               protocol="HTTP/1.1")
    return writer.create_warc_record(uri, "response", payload=io.BytesIO(body), length=len(body),
                                     http_headers=headers, warc_headers_dict=_warc_headers(uri, "response", n))


def _http_request(writer, uri: str, n: int):
    from warcio.statusandheaders import StatusAndHeaders

    parts = urlsplit(uri)
    headers = StatusAndHeaders(f"GET {parts.path} HTTP/1.1", [("Host", parts.netloc)], is_http_request=True)
    return writer.create_warc_record(uri, "request", payload=io.BytesIO(b""), length=0, http_headers=headers,
                                     warc_headers_dict=_warc_headers(uri, "request", n))


def _warc_image_records(plan: _Plan, photos, originals: dict[str, bytes]) -> list[dict]:
    """Image responses stored in the WARC: two WARC-only images, an exact copy of a site photo under
    a new URI, a URL that is also in urls.txt (deduplicated to the list's item) and an HTTP 404."""
    last = photos[-1][0]
    return [
        {"uri": plan.url("warc-only/poster.jpg"), "status": "200 OK", "type": "image/jpeg",
         "body": encode(_crop(photos[1][2], 0.15), "JPEG", 85)},
        {"uri": plan.url("warc-only/pattern.png"), "status": "200 OK", "type": "image/png",
         "body": encode(_shapes(np.random.default_rng(7), 160), "PNG")},
        {"uri": plan.url(f"warc-only/{last}-copy.jpg"), "status": "200 OK", "type": "image/jpeg",
         "body": originals[last]},
        {"uri": plan.url(f"photos/{photos[1][0]}.jpg"), "status": "200 OK", "type": "image/jpeg",
         "body": originals[photos[1][0]]},
        {"uri": plan.url("warc-only/gone.jpg"), "status": "404 Not Found", "type": "image/jpeg",
         "body": b"Not Found\n"},
    ]


def build_warc(plan: _Plan, pages: dict[str, str], images: list[dict]) -> bytes:
    """Deterministic gzip WARC: warcinfo, a request, page responses and image responses interleaved."""
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    fields = b"software: lvd demo-corpus\r\n"
    info = writer.create_warc_record("", "warcinfo", payload=io.BytesIO(fields), length=len(fields),
                                     warc_content_type="application/warc-fields",
                                     warc_headers_dict=_warc_headers("", "warcinfo", 0))
    records = [info]
    page_items = list(pages.items())
    for n, (path, html) in enumerate(page_items, start=1):
        uri = plan.url(path)
        if n == 1:
            records.append(_http_request(writer, uri, n))
        records.append(_http_response(writer, uri, 10 + n, "200 OK", "text/html; charset=utf-8", html.encode()))
        records += [_http_response(writer, im["uri"], 20 + 10 * n + k, im["status"], im["type"], im["body"])
                    for k, im in enumerate(images[(n - 1) * 3:n * 3])]
    for record in records:
        writer.write_record(record)
    return buf.getvalue()


# --------------------------------------------------------------------------- curated / eval


def _add_curated(plan: _Plan, photos) -> None:
    family = _family_photos(photos)
    for i, (name, _, img) in enumerate(family):
        small = _fit(img, 384)
        if i == len(family) - 1:
            plan.files[f"curated/more/{name}.png"] = encode(small, "PNG")
        else:
            plan.files[f"curated/{name}.jpg"] = encode(small, "JPEG", 85)


def _add_eval(plan: _Plan, photos) -> None:
    """Eval images: copies of two non-family photos (decontamination removes their uncurated
    copies; family photos stay for retrieval) and generated patterns that are in no other set."""
    by_name = {name: img for name, _, img in photos}
    chosen = [n for n in EVAL_PHOTOS if n in by_name] or [photos[-1][0]]
    families = plan.truth["near_duplicate_families"]
    for name in chosen:
        cls, img = EVAL_PHOTOS.get(name, name), by_name[name]
        plan.files[f"eval/{cls}/{cls}-crop.jpg"] = encode(_crop(img, 0.04), "JPEG", 90)
        plan.files[f"eval/{cls}/{cls}-flip.jpg"] = encode(img.transpose(Image.FLIP_LEFT_RIGHT), "JPEG", 90)
        plan.truth["eval_copies"][f"eval/{cls}/{cls}-crop.jpg"] = families.get(name, [plan.url(f"photos/{name}.jpg")])
    rng = np.random.default_rng(2024)
    for i in range(2):
        plan.files[f"eval/pattern/pattern-{i:02d}.png"] = encode(_shapes(rng, 160), "PNG")


LABELLED_CLASSES = 6
LABELLED_PER_CLASS = {"train": 8, "val": 4}


def _add_labelled(plan: _Plan, photos) -> None:
    """Random crops of a few photos, 64 px, one class per photo: what `eval` and the online kNN probe use."""
    rng = np.random.default_rng(7)
    for name, _, img in photos[-LABELLED_CLASSES:]:
        for split, n in LABELLED_PER_CLASS.items():
            for i in range(n):
                scale = float(rng.uniform(0.25, 0.6))
                w, h = max(8, round(img.width * scale)), max(8, round(img.height * scale))
                x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
                crop = img.crop((x, y, x + w, y + h)).convert("RGB").resize((64, 64), Image.BICUBIC)
                plan.files[f"labelled/{split}/{name}/{name}-{i:02d}.jpg"] = encode(crop, "JPEG", 90)


# --------------------------------------------------------------------------- manifest


def _exact_duplicates(plan: _Plan) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    served = {plan.url(p[len("site/"):]): b for p, b in plan.files.items() if p.startswith("site/")}
    listed = set(plan.url_lines) | set(plan.truth["warc_page_only"])
    for url in sorted(listed):
        if url in served and not url.startswith(plan.url("private/")):
            groups.setdefault(hashlib.sha256(served[url]).hexdigest(), []).append(url)
    for im in plan.warc_images:
        if im["status"].startswith("200") and im["uri"] not in listed:
            groups.setdefault(hashlib.sha256(im["body"]).hexdigest(), []).append(im["uri"])
    return sorted(sorted(set(g)) for g in groups.values() if len(set(g)) > 1)


def _expected_items(plan: _Plan, page_urls: list[str]) -> dict:
    """Items of a Source(urls=urls.txt, warc=[pages.warc.gz], images=curated), by origin, in order."""
    url_items: list[str] = []
    for url in plan.url_lines + page_urls:
        if url not in url_items:
            url_items.append(url)
    warc_items = [im["uri"] for im in plan.warc_images if im["uri"] not in url_items]
    files = sorted(p[len("curated/"):] for p in plan.files if p.startswith("curated/"))
    return {"url": url_items, "warc": warc_items, "file": files}


def _manifest(plan: _Plan, page_urls: list[str]) -> dict:
    duplicate_lines = sorted({u for u in plan.url_lines if plan.url_lines.count(u) > 1})
    expected = _expected_items(plan, page_urls)
    return {
        "version": MANIFEST_VERSION,
        "base_url": plan.base_url,
        "paths": {"site": "site", "urls": "urls.txt", "warc": "pages.warc.gz", "curated": "curated",
                  "eval": "eval", "labelled": "labelled", "access_log": "access.log"},
        "counts": {
            "url_lines": len(plan.url_lines), "unique_urls": len(set(plan.url_lines)),
            "site_files": sum(p.startswith("site/") for p in plan.files),
            "warc_image_records": len(plan.warc_images), "warc_page_image_urls": len(page_urls),
            "curated": len(expected["file"]), "eval": sum(p.startswith("eval/") for p in plan.files),
            "expected_items": sum(len(v) for v in expected.values()),
            "bytes": sum(len(b) for b in plan.files.values()),
        },
        "truth": {**plan.truth, "exact_duplicates": _exact_duplicates(plan), "duplicate_url_lines": duplicate_lines,
                  "warc_images": [{"uri": im["uri"], "status": int(im["status"].split()[0])} for im in plan.warc_images]},
        "expected_items": expected,
        "files": {p: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for p, b in sorted(plan.files.items())},
    }


# --------------------------------------------------------------------------- build


def plan_corpus(base_url: str) -> tuple[_Plan, dict]:
    """Compute every file of the corpus in memory; returns the plan and the manifest."""
    plan = _Plan(base_url=base_url.rstrip("/"))
    photos = load_photos()
    originals = _add_photos(plan, photos)
    _add_near_dups(plan, photos)
    _add_mirrors(plan, photos, originals)
    _add_families(plan, photos)
    generated = _add_generated(plan)
    plan.add_site("gen/gradient-00-again.png", generated["gradient-00.png"])
    _add_private(plan, photos, generated)
    _add_bad(plan, originals)
    plan.url_lines.append(plan.url_lines[0])  # one repeated line
    pages = _add_extra_and_pages(plan, photos)
    plan.warc_images = _warc_image_records(plan, photos, originals)
    copy_uri = plan.url(f"warc-only/{photos[-1][0]}-copy.jpg")
    plan.truth["derived_from"].update({plan.url("warc-only/poster.jpg"): photos[1][0], copy_uri: photos[-1][0]})
    plan.truth["copy_of"][copy_uri] = photos[-1][0]
    plan.files["pages.warc.gz"] = build_warc(plan, pages, plan.warc_images)
    plan.files["urls.txt"] = ("\n".join(plan.url_lines) + "\n").encode()
    _add_curated(plan, photos)
    _add_eval(plan, photos)
    _add_labelled(plan, photos)
    extra = [u.rsplit("/", 1)[1] for u in plan.truth["warc_page_only"]]
    return plan, _manifest(plan, _page_image_urls(plan, photos, extra))


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def _remove_stale(root: Path, keep: Iterable[str]) -> None:
    keep = set(keep)
    for top in MANAGED_DIRS:
        for path in sorted((root / top).rglob("*"), reverse=True):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and rel not in keep:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def _is_up_to_date(corpus: DemoCorpus) -> bool:
    try:
        manifest = json.loads(corpus.manifest.read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("base_url") != corpus.base_url:
        return False
    for rel, meta in manifest.get("files", {}).items():
        path = corpus.root / rel
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return False
        if hashlib.sha256(path.read_bytes()).hexdigest() != meta["sha256"]:
            return False
    return True


def build_demo_corpus(out: Path, base_url: str = DEFAULT_BASE_URL) -> DemoCorpus:
    """Build (or refresh) the demo corpus under ``out``; files already correct are left untouched."""
    corpus = DemoCorpus.at(Path(out), base_url.rstrip("/"))
    if _is_up_to_date(corpus):
        return corpus
    plan, manifest = plan_corpus(corpus.base_url)
    corpus.root.mkdir(parents=True, exist_ok=True)
    for rel, data in plan.files.items():
        _write_if_changed(corpus.root / rel, data)
    _remove_stale(corpus.root, plan.files)
    _write_if_changed(corpus.manifest, _manifest_bytes(manifest))
    return corpus


# --------------------------------------------------------------------------- server


def _sniff_type(data: bytes, path: Path) -> str:
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"BM"):
        return "image/bmp"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "text/html; charset=utf-8"
    return CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


class _Handler(BaseHTTPRequestHandler):
    server_version = "lvd-demo/1"
    demo: "DemoServer"  # set on the per-server subclass

    def _resolve(self) -> Path | None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            return None
        path = self.demo.site.joinpath(*parts) if parts else self.demo.site
        return path / "index.html" if path.is_dir() else path

    def _respond(self, head_only: bool) -> None:
        path = self._resolve()
        if path is None or not path.is_file():
            status, body, ctype = 404, b"<html><body>404 Not Found</body></html>\n", "text/html; charset=utf-8"
        else:
            status, body = 200, path.read_bytes()
            ctype = _sniff_type(body, path)
        self.demo._record(self.command, self.path, status)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._respond(head_only=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(head_only=True)

    def log_message(self, format: str, *args) -> None:  # quiet: requests go to access.log
        pass


class DemoServer:
    """The demo site on a background thread; counts and logs every request."""

    def __init__(self, corpus_root: Path, host: str = "127.0.0.1", port: int = 8765):
        self.root = Path(corpus_root)
        self.site = self.root / "site"
        self.access_log = self.root / "access.log"
        self.paths: list[str] = []
        self._lock = threading.Lock()
        handler = type("DemoHandler", (_Handler,), {"demo": self})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="demo-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> int:
        with self._lock:
            return len(self.paths)

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.paths.append(path)
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.access_log, "a", encoding="utf-8") as fh:
                fh.write(f"{method} {path} {status}\n")

    def start(self) -> "DemoServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> "DemoServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_demo_corpus(corpus_root: Path, host: str = "127.0.0.1", port: int = 8765) -> DemoServer:
    """Start serving ``corpus_root/site`` in a background thread (port 0 picks a free port)."""
    return DemoServer(corpus_root, host, port).start()


def main_serve(corpus_root: Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until SIGINT/SIGTERM (blocking); prints the URL."""
    site = Path(corpus_root) / "site"
    if not site.is_dir():
        raise FileNotFoundError(f"{site} does not exist; build the corpus first with `lvd demo-corpus`")
    done = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with serve_demo_corpus(corpus_root, host, port) as server:
            print(f"serving {site} at {server.url}/ (Ctrl-C to stop)", flush=True)
            done.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["DemoCorpus", "DemoServer", "build_demo_corpus", "main_serve", "plan_corpus", "serve_demo_corpus"]
