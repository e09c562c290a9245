"""BasicSR-format LMDBs: what a database carries besides its values, its checks, and the safe writer.

``meta`` (``meta_info.txt`` lines and the build record), ``checks`` (reading a database safely when a dataset is
built), ``install`` (putting built databases in place, recovering interrupted installs), ``writer`` (image folders to
databases; ``python -m datprl_arch.tools.make_lmdb`` is its command line). BasicSR keeps the same split:
``basicsr/utils/lmdb_util.py`` for the library, ``scripts/data_preparation/create_lmdb.py`` for the script.
"""
