"""Write image folders into BasicSR-format LMDBs, safely.

    python -m datprl_arch.tools.make_lmdb --gt data/gt --gt-lmdb data/gt.lmdb [--lq data/lq --lq-lmdb data/lq.lmdb]

The command line of :mod:`datprl_arch.data.lmdb.writer` (what is checked, how an interrupted run is recovered):
one PNG value per image under its file stem, LQ values under their GT's key, a ``meta_info.txt`` and a build record;
nothing is installed before every value was read back.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from datprl_arch.data.lmdb.writer import (DEFAULT_COMPRESS_LEVEL, LmdbWriteError, folder_items, make_paired_lmdb,
                                          write_lmdb)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from basicsr.utils import get_root_logger

    parser = argparse.ArgumentParser(prog='python -m datprl_arch.tools.make_lmdb', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--gt', required=True, help='folder of GT images (or of any images, without --lq)')
    parser.add_argument('--gt-lmdb', required=True, help='output path for the GT database, ending in .lmdb')
    parser.add_argument('--lq', help='folder of LQ images paired with --gt by file stem')
    parser.add_argument('--lq-lmdb', help='output path for the LQ database, ending in .lmdb')
    parser.add_argument('--filename-tmpl', default='{}', help="LQ stem from GT stem, e.g. '{}_x4' (default '{}')")
    parser.add_argument('--compress-level', type=int, default=DEFAULT_COMPRESS_LEVEL,
                        help='PNG level 0-9 (0: raw, fastest to read, largest)')
    parser.add_argument('--map-size', type=int, help='LMDB map size in bytes (default: from the image sizes)')
    parser.add_argument('--overwrite', action='store_true', help='replace existing databases')
    args = parser.parse_args(argv)
    if bool(args.lq) != bool(args.lq_lmdb):
        parser.error('--lq and --lq-lmdb go together.')
    options = dict(compress_level=args.compress_level, map_size=args.map_size, overwrite=args.overwrite)
    try:
        if args.lq:
            count = make_paired_lmdb(args.gt, args.lq, args.gt_lmdb, args.lq_lmdb, args.filename_tmpl, **options)
        else:
            count = write_lmdb(folder_items(args.gt), args.gt_lmdb, **options)
    except LmdbWriteError as err:
        parser.exit(2, f'error: {err}\n')
    targets = ' and '.join(p for p in (args.gt_lmdb, args.lq_lmdb) if p)
    logger = get_root_logger()
    logger.setLevel(logging.INFO)
    logger.info(f'Wrote {count} images to {targets}.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
