#!/usr/bin/python3
"""Writes the DICOM test images and what numpy says about them, at test time.

    /usr/bin/python3 tests/data/dicom/make_images.py OUT_DIR
    /usr/bin/python3 tests/data/dicom/make_images.py --corpus OUT_DIR   (tiny seeds for fuzzing)

Images come from two independent writers: pydicom (8 and 16 bits, signed and unsigned, with and
without Rescale Slope/Intercept, implicit and explicit VR, several frames, RGB in both planar
configurations, big endian, JPEG-encapsulated, undefined-length sequences) and dcmtk's
`img2dcm -i BMP` on a BMP written here with the standard library. Patient identifiers are put in
on purpose: the parser must skip them.

OUT_DIR/manifest.json lists every file with the verdict the C code must reach:
  "probe": "ok" or a substring of the expected reason
  "read":  "ok", "unsupported" or "parse"
and, for decodable images, "expected": the header fields, min, max, mean, numpy.histogram with
64 bins, the default windows with their fractions, and a position-weighted checksum of the
stored values in the reader's order (frame, row, column, sample), all computed by numpy from
pydicom's pixel_array. tests/unit/trial/test_dicom.c and tests/integration/test_analyze.py
read it.

Run with Debian's /usr/bin/python3 (python3-pydicom, python3-numpy; dcmtk for img2dcm).
"""
import json
import os
import shutil
import struct
import subprocess
import sys

try:
    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import (ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                             JPEGBaseline8Bit)
except ImportError as e:  # pragma: no cover - a set-up problem, said plainly
    sys.exit(f"make_images.py: {e}: run with /usr/bin/python3 (python3-pydicom, python3-numpy)")

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
US_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
BINS = 64
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-0042-SECRET",
           "PatientBirthDate": "19700101"}


def base_dataset(sop_class, syntax, modality, rows, cols, uid_suffix):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.4242." + uid_suffix
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    ds = Dataset()
    ds.file_meta = meta
    ds.is_little_endian = syntax != ExplicitVRBigEndian
    ds.is_implicit_VR = syntax == ImplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if modality is not None:
        ds.Modality = modality
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.Rows = rows
    ds.Columns = cols
    return ds


def monochrome(ds, bits_allocated, bits_stored, signed):
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0


def nested_sequences(ds):
    """An undefined-length sequence holding an undefined-length item with another one inside:
    the walk must follow items and delimiters, not lengths."""
    code = Dataset()
    code.CodeValue = "T-D3000"
    code.CodingSchemeDesignator = "SRT"
    code.CodeMeaning = "Chest"
    inner = Sequence([code])
    inner.is_undefined_length = True
    item = Dataset()
    item.AnatomicRegionSequence = inner
    item.PatientComments = "private remark that must never be read"
    outer = Sequence([item, Dataset()])
    ds.RequestAttributesSequence = outer
    ds["RequestAttributesSequence"].is_undefined_length = True
    ds["RequestAttributesSequence"].value[0].is_undefined_length_sequence_item = True
    ds.RequestAttributesSequence[0]["AnatomicRegionSequence"].is_undefined_length = True


def phantom(rng, shape, levels, noise, lo, hi):
    """Regions at a few levels plus noise, clipped to the stored range."""
    img = np.zeros(shape, dtype=np.float64)
    h, w = shape[-2], shape[-1]
    yy, xx = np.mgrid[0:h, 0:w]
    img[...] = levels[0]
    img[..., (yy - h / 2) ** 2 / (h / 2.5) ** 2 + (xx - w / 2) ** 2 / (w / 2.5) ** 2 < 1] = levels[1]
    img[..., (yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 6) ** 2] = levels[2]
    img[..., (yy - h / 3) ** 2 + (xx - 2 * w / 3) ** 2 < (min(h, w) / 8) ** 2] = levels[3]
    img += rng.normal(0, noise, size=shape)
    return np.clip(np.rint(img), lo, hi)


def save(ds, path):
    ds.save_as(path, write_like_original=False)


def stored_range(bits, signed):
    span = 2.0 ** bits
    lo = -span / 2 if signed else 0.0
    return lo, lo + span - 1


def expected(path, modality_hint=None):
    """numpy's view of the file, through pydicom."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    spp = int(ds.SamplesPerPixel)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    slope, intercept = 1.0, 0.0
    has_rescale = "RescaleSlope" in ds or "RescaleIntercept" in ds
    if spp == 1 and has_rescale:
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0))
    stored = arr.astype(np.int64)
    values = stored.astype(np.float64) * slope + intercept
    flat = values.ravel()
    counts, edges = np.histogram(flat, bins=BINS)
    modality = str(ds.Modality)
    bits_stored = int(ds.BitsStored)
    signed = int(ds.PixelRepresentation) == 1
    if (modality_hint or modality) == "CT":
        windows = [("lung", -1000.0, -400.0), ("soft", -160.0, 240.0), ("bone", 300.0, 3000.0)]
    else:
        lo_s, hi_s = stored_range(bits_stored, signed)
        lo, hi = lo_s * slope + intercept, hi_s * slope + intercept
        lo, hi = min(lo, hi), max(lo, hi)
        third = (hi - lo) / 3
        windows = [("low", lo, lo + third), ("mid", lo + third, lo + 2 * third),
                   ("high", lo + 2 * third, hi)]
    sflat = stored.ravel()
    weights = (np.arange(sflat.size, dtype=np.int64) % 1000) + 1
    return {
        "rows": int(ds.Rows), "columns": int(ds.Columns), "frames": frames,
        "samples_per_pixel": spp, "bits_allocated": int(ds.BitsAllocated),
        "bits_stored": bits_stored, "pixel_representation": int(ds.PixelRepresentation),
        "photometric": str(ds.PhotometricInterpretation), "modality": modality,
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "slope": slope, "intercept": intercept,
        "pixels": int(ds.Rows) * int(ds.Columns) * frames, "samples": int(sflat.size),
        "min": float(flat.min()), "max": float(flat.max()), "mean": float(flat.mean()),
        "histogram": {"bins": BINS, "min": float(edges[0]), "max": float(edges[-1]),
                      "counts": [int(c) for c in counts]},
        "windows": [{"name": n, "min": a, "max": b,
                     "count": int(np.count_nonzero((flat >= a) & (flat <= b))),
                     "fraction": float(np.count_nonzero((flat >= a) & (flat <= b)) / flat.size)}
                    for n, a, b in windows],
        "checksum": int(np.sum(sflat * weights)),
    }


def write_bmp(path, width, height, rng):
    """A 24-bit bottom-up BMP, standard library only."""
    row_bytes = (width * 3 + 3) // 4 * 4
    rows = []
    for y in range(height):
        row = bytearray()
        for x in range(width):
            b, g, r = (x * 11 + y * 3) % 256, (y * 17) % 256, int(rng.integers(0, 256))
            row += bytes((b, g, r))
        row += b"\0" * (row_bytes - width * 3)
        rows.append(bytes(row))
    pixels = b"".join(rows)
    header = b"BM" + struct.pack("<IHHI", 14 + 40 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    with open(path, "wb") as f:
        f.write(header + info + pixels)


def make_all(out):
    rng = np.random.default_rng(20261129)
    files = []

    def add(name, probe="ok", read="ok", modality_hint=None):
        entry = {"file": name, "probe": probe, "read": read}
        if read == "ok":
            entry["expected"] = expected(os.path.join(out, name), modality_hint)
        files.append(entry)

    # CT, explicit VR LE, signed 16 bits, Rescale -1024, nested undefined-length sequences.
    ds = base_dataset(CT_STORAGE, ExplicitVRLittleEndian, "CT", 48, 64, "1")
    monochrome(ds, 16, 16, True)
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    nested_sequences(ds)
    hu = phantom(rng, (48, 64), [-1000, -700, 40, 1200], 30, -2048, 3071)
    ds.PixelData = (hu + 1024).astype("<i2").tobytes()
    save(ds, os.path.join(out, "ct_explicit_signed.dcm"))
    add("ct_explicit_signed.dcm")

    # CT, implicit VR LE, unsigned 12 of 16 bits, fractional slope and intercept.
    ds = base_dataset(CT_STORAGE, ImplicitVRLittleEndian, "CT", 37, 41, "2")
    monochrome(ds, 16, 12, False)
    ds.RescaleIntercept = "-1000.25"
    ds.RescaleSlope = "0.5"
    raw = phantom(rng, (37, 41), [0, 600, 2080, 4000], 40, 0, 4095)
    ds.PixelData = raw.astype("<u2").tobytes()
    save(ds, os.path.join(out, "ct_implicit_12bit.dcm"))
    add("ct_implicit_12bit.dcm")

    # MR, three frames, unsigned 16 bits, no rescale.
    ds = base_dataset(MR_STORAGE, ExplicitVRLittleEndian, "MR", 20, 24, "3")
    monochrome(ds, 16, 16, False)
    ds.NumberOfFrames = 3
    raw = phantom(rng, (3, 20, 24), [100, 900, 2500, 60000], 200, 0, 65535)
    ds.PixelData = raw.astype("<u2").tobytes()
    save(ds, os.path.join(out, "mr_multiframe.dcm"))
    add("mr_multiframe.dcm")

    # US, 8 bits unsigned, no rescale.
    ds = base_dataset(US_STORAGE, ExplicitVRLittleEndian, "US", 30, 50, "4")
    monochrome(ds, 8, 8, False)
    raw = phantom(rng, (30, 50), [10, 90, 160, 250], 12, 0, 255)
    ds.PixelData = raw.astype("u1").tobytes()
    save(ds, os.path.join(out, "us_8bit.dcm"))
    add("us_8bit.dcm")

    # OT, 8 bits signed, odd size (the pixel data gets a pad byte), implicit VR.
    ds = base_dataset(SC_STORAGE, ImplicitVRLittleEndian, "OT", 13, 17, "5")
    monochrome(ds, 8, 8, True)
    raw = phantom(rng, (13, 17), [-100, -20, 50, 120], 15, -128, 127)
    ds.PixelData = raw.astype("i1").tobytes() + b"\0"  # padded to an even length
    save(ds, os.path.join(out, "ot_8bit_signed.dcm"))
    add("ot_8bit_signed.dcm")

    # RGB, planar configuration 1 (R plane, G plane, B plane).
    ds = base_dataset(SC_STORAGE, ExplicitVRLittleEndian, "OT", 7, 9, "6")
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 1
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    rgb = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()
    save(ds, os.path.join(out, "rgb_planar.dcm"))
    add("rgb_planar.dcm")

    # Explicit VR big endian: valid, not decoded.
    ds = base_dataset(CT_STORAGE, ExplicitVRBigEndian, "CT", 8, 8, "7")
    monochrome(ds, 16, 16, True)
    ds.PixelData = np.arange(64, dtype=">i2").tobytes()
    save(ds, os.path.join(out, "ct_big_endian.dcm"))
    add("ct_big_endian.dcm", read="unsupported")

    # JPEG baseline: encapsulated fragments (not a real JPEG: the parser never decodes them).
    ds = base_dataset(SC_STORAGE, JPEGBaseline8Bit, "OT", 16, 16, "8")
    monochrome(ds, 8, 8, False)
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(range(40)) + b"\xff\xd9",
                                b"\xff\xd8" + bytes(30) + b"\xff\xd9"])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.NumberOfFrames = 2
    save(ds, os.path.join(out, "jpeg_encapsulated.dcm"))
    add("jpeg_encapsulated.dcm", read="unsupported")

    # dcmtk: a BMP through img2dcm. It writes no Modality: first as is (rejected), then with
    # Modality and a patient name added by dcmodify.
    if shutil.which("img2dcm") is None or shutil.which("dcmodify") is None:
        sys.exit("make_images.py: img2dcm/dcmodify not found (Debian package dcmtk)")
    bmp = os.path.join(out, "rgb.bmp")
    write_bmp(bmp, 23, 17, rng)
    no_modality = os.path.join(out, "img2dcm_no_modality.dcm")
    subprocess.run(["img2dcm", "-i", "BMP", bmp, no_modality], check=True)
    add("img2dcm_no_modality.dcm", probe="missing Modality", read="parse")
    rgb_dcm = os.path.join(out, "img2dcm_rgb.dcm")
    shutil.copyfile(no_modality, rgb_dcm)
    subprocess.run(["dcmodify", "-nb", "-i", "(0008,0060)=OT", "-i",
                    "(0010,0010)=" + PATIENT["PatientName"], rgb_dcm], check=True)
    add("img2dcm_rgb.dcm")

    # Not DICOM at all.
    with open(os.path.join(out, "not_dicom.dcm"), "wb") as f:
        f.write(b"<html>not an image</html>\n" * 10)
    add("not_dicom.dcm", probe="not DICOM: no DICM preamble", read="parse")

    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"patient": PATIENT, "files": files}, f, indent=1)
    return files


def make_corpus(out):
    """Small seeds for the fuzzer: tiny valid images in each syntax and a few broken ones."""
    rng = np.random.default_rng(7)
    seeds = []
    for n, (syntax, bits, signed) in enumerate([(ExplicitVRLittleEndian, 16, True),
                                                (ImplicitVRLittleEndian, 16, False),
                                                (ExplicitVRLittleEndian, 8, False),
                                                (ExplicitVRBigEndian, 16, True)]):
        ds = base_dataset(CT_STORAGE, syntax, "CT", 4, 4, "9%d" % n)
        monochrome(ds, bits, bits, signed)
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        if n == 0:
            nested_sequences(ds)
        dtype = {8: "u1", 16: ("i2" if signed else "u2")}[bits]
        order = ">" if syntax == ExplicitVRBigEndian else "<"
        ds.PixelData = rng.integers(0, 100, size=(4, 4)).astype(order + dtype if bits > 8
                                                                else dtype).tobytes()
        name = "valid_%d.dcm" % n
        save(ds, os.path.join(out, name))
        seeds.append(name)
    ds = base_dataset(SC_STORAGE, ExplicitVRLittleEndian, "OT", 2, 3, "95")
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 1
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(18))
    save(ds, os.path.join(out, "valid_rgb_planar.dcm"))
    ds = base_dataset(SC_STORAGE, JPEGBaseline8Bit, "OT", 4, 4, "96")
    monochrome(ds, 8, 8, False)
    ds.PixelData = encapsulate([b"\xff\xd8\x00\x01\xff\xd9"])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    save(ds, os.path.join(out, "valid_jpeg.dcm"))
    with open(os.path.join(out, "valid_0.dcm"), "rb") as f:
        good = f.read()
    with open(os.path.join(out, "truncated_header.dcm"), "wb") as f:
        f.write(good[:200])
    with open(os.path.join(out, "truncated_pixels.dcm"), "wb") as f:
        f.write(good[:-5])
    with open(os.path.join(out, "no_preamble.dcm"), "wb") as f:
        f.write(good[132:])
    with open(os.path.join(out, "bad_vr.dcm"), "wb") as f:
        i = good.index(b"CS", 140)
        f.write(good[:i] + b"c$" + good[i + 2:])


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--corpus":
        os.makedirs(sys.argv[2], exist_ok=True)
        make_corpus(sys.argv[2])
        return
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    files = make_all(out)
    print("make_images.py: %d files in %s" % (len(files), out))


if __name__ == "__main__":
    main()
