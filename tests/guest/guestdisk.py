#!/usr/bin/env python3
"""guestdisk.py: read what the boot-sector test guest (guest.S) leaves on
a disk, for the tests and the demo.

  guestdisk.py params IMAGE             -> "TOTAL BASE NSECT BATCH DELAY_US"
                                           (the VRGP block at 0x1e0)
  guestdisk.py max-stamp DISK BASE NSECT -> largest sequence stamp in the
                                           guest's sectors (0: none)
  guestdisk.py check DISK TOTAL BASE NSECT
      exit 0 if every sector of the guest's range holds the last stamp the
      guest wrote there, else print the first differences and exit 1

A stamped sector is "VRSEQ\\0\\0\\0", u32 seq, u32 LBA, then u32 seq
repeated to 512 bytes; write s goes to LBA BASE + (s - 1) % NSECT.
"""
import struct
import sys

MAGIC = b"VRSEQ\0\0\0"


def params(image):
    b = open(image, "rb").read(512)
    if b[0x1E0:0x1E4] != b"VRGP":
        sys.exit("%s: no VRGP parameter block" % image)
    print(*struct.unpack_from("<5I", b, 0x1E4))


def max_stamp(disk, base, nsect):
    m = 0
    try:
        with open(disk, "rb") as f:
            f.seek(base * 512)
            data = f.read(nsect * 512)
        for i in range(0, len(data) - 15, 512):
            if data[i:i + 8] == MAGIC:
                m = max(m, struct.unpack_from("<I", data, i + 8)[0])
    except OSError:
        pass
    print(m)


def check(disk, total, base, nsect):
    bad = 0
    with open(disk, "rb") as f:
        for i in range(min(nsect, total)):
            # the largest s <= total with (s - 1) % nsect == i
            s = total - ((total - 1 - i) % nsect)
            want = struct.pack("<8sII", MAGIC, s, base + i) + \
                struct.pack("<I", s) * 124
            f.seek((base + i) * 512)
            got = f.read(512)
            if got != want:
                bad += 1
                if bad <= 5:
                    print("LBA %d: want seq %d, got %r" % (base + i, s,
                                                           got[:16]))
    if bad:
        print("%d of %d sectors without the expected stamp"
              % (bad, min(nsect, total)))
        sys.exit(1)


def main(argv):
    if len(argv) == 3 and argv[1] == "params":
        params(argv[2])
    elif len(argv) == 5 and argv[1] == "max-stamp":
        max_stamp(argv[2], int(argv[3]), int(argv[4]))
    elif len(argv) == 6 and argv[1] == "check":
        check(argv[2], int(argv[3]), int(argv[4]), int(argv[5]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
