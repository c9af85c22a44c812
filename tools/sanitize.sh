#!/usr/bin/env bash
# `make sanitize`: pairpack/_native.c built with AddressSanitizer + UndefinedBehaviorSanitizer (gcc)
# and the tests that feed it hostile input run against that build: the kernels, hostile datasets,
# the mutation fuzzer's test, the CLI bad-input table, and the coverage-guided fuzz corpora.
#
# The tree is copied to build/sanitize/repo so the checkout's own extension is never replaced
# (subprocess tests import pairpack from the repo root, so they use the sanitized build too).
# Python itself is not instrumented: libasan is preloaded and leak detection is off (CPython's
# allocations at exit are not leaks). Any sanitizer report aborts the run (exit != 0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CC=${CC:-gcc}
DIR=${SANITIZE_DIR:-build/sanitize}
start=$(date +%s)

rm -rf "$DIR" && mkdir -p "$DIR/repo"
tar --exclude=./build --exclude=./.git --exclude='*.so' --exclude=.hypothesis --exclude=__pycache__ -cf - . \
    | tar -xf - -C "$DIR/repo"
[ -d ../shared ] && ln -s "$(cd ../shared && pwd)" "$DIR/shared"  # tests find ../shared beside the tree
cd "$DIR/repo"

SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
CC=$CC CFLAGS="$SAN" LDSHARED="$CC -shared" LDFLAGS="$SAN" $PYTHON setup.py -q build_ext --inplace --force \
    2>&1 | grep -v -i "warning\|!!\|^ *\*\*\*\|^$\|corresp\|deprecat\|See https\|\*\*\*\*\*" || true
so=$(ls pairpack/_native*.so)
# ldd's output read whole first: `ldd | grep -q` under pipefail fails when grep exits at its match
# before ldd has written everything (SIGPIPE), which a loaded machine makes likely (seen in a CI run)
libs=$(ldd "$so")
grep -q libasan <<<"$libs" || { echo "sanitize: $so is not linked against libasan" >&2; exit 1; }

export LD_PRELOAD
LD_PRELOAD="$($CC -print-file-name=libasan.so) $($CC -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH=$PWD HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
$PYTHON -c "import pairpack._accel as a, sys; sys.exit(a.native is None)" \
    || { echo "sanitize: the sanitized pairpack._native does not import" >&2; exit 1; }

# SANITIZE_TESTS narrows the set (.ci/run: the in-process ones; the CLI table spawns a process per row)
$PYTHON -m pytest -q -p no:cacheprovider ${SANITIZE_TESTS:-tests/test_native.py tests/test_hostile.py \
    tests/test_fuzz.py tests/test_cli_bad_input.py} "$@"
# every seed of the coverage-guided harness through the sanitized kernels (atheris when installed)
if $PYTHON -c "import atheris" 2>/dev/null; then
    for t in json dataset; do
        $PYTHON tools/fuzz_cov.py "$t" --replay tools/fuzz_corpus/"$t"/* >/dev/null
    done
    echo "sanitize: fuzz corpora replayed"
else
    echo "sanitize: atheris not installed, fuzz corpora not replayed (pip install atheris==3.0.0)"
fi
echo "sanitize: green in $(( $(date +%s) - start )) s"
