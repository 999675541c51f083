#!/usr/bin/env python3
"""mkguest.py — assemble guest.S into the 512-byte boot sector guest.img.

usage: mkguest.py AS LD INPUT.S OUTPUT.img [SYM=VALUE...]

Runs `AS --32 --defsym SYM=VALUE... -o OUTPUT.o INPUT.S`, then
`LD -m elf_i386 --oformat binary -Ttext 0x7c00 -e _start -o OUTPUT OUTPUT.o`,
and checks that the result is exactly 512 bytes ending in 0x55 0xAA and
carries the "VRGP" parameter block at 0x1e0 (see guest.S).
"""
import os
import subprocess
import sys


def main(argv):
    if len(argv) < 5:
        sys.exit(__doc__)
    as_, ld, src, out = argv[1:5]
    obj = out + ".o"
    cmd = [as_, "--32"]
    for d in argv[5:]:
        cmd += ["--defsym", d]
    subprocess.run(cmd + ["-o", obj, src], check=True)
    subprocess.run([ld, "-m", "elf_i386", "--oformat", "binary",
                    "-Ttext", "0x7c00", "-e", "_start", "-o", out, obj],
                   check=True)
    os.unlink(obj)
    with open(out, "rb") as f:
        img = f.read()
    errors = []
    if len(img) != 512:
        errors.append("is %d bytes, not 512" % len(img))
    if img[510:512] != b"\x55\xaa":
        errors.append("has no 0x55AA boot signature at offset 510")
    if img[0x1E0:0x1E4] != b"VRGP":
        errors.append("has no VRGP parameter block at 0x1e0")
    if errors:
        os.unlink(out)
        sys.exit("mkguest: %s %s" % (out, "; ".join(errors)))


if __name__ == "__main__":
    main(sys.argv)
