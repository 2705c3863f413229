# cuda.mk: the CUDA trainer, included by the Makefile. Active only where nvcc
# exists; on a machine without a GPU it still compiles and links everything.
#
#   train_gpt_cu            standalone trainer (the flags of ./train_gpt)
#   gpt_cuda$(EXT)          the Python module (gpt.pyx built as gpt_cuda), bf16
#   gpt_cuda_fp32$(EXT)     the same in fp32 (-DGPT_FP32), for close comparison with the CPU
#   build/libkernel_bench.so  dev/kernel_bench.cu: the PTX kernels against their CUDA C twins and the
#                           wgmma GEMM against cuBLASLt (tests/test_ptx.py, dev/bench/bench_ptx.py)
#   build/train_gpt_cu.ptx  the bf16 build's kernels as PTX, which tests/test_cuda_emu.py runs on the
#                           CPU (dev/ptx_emu.py)
#   make gpu-check          the one prepared GPU run: dev/gpu_check.sh
#
# cuBLAS and NCCL come from the CUDA toolkit, or from /usr, or from the PyPI
# wheels nvidia-cublas / nvidia-nccl-cu13 (an rpath points at wherever they are).

NVCC := $(shell command -v nvcc 2>/dev/null)

ifneq ($(NVCC),)

CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(realpath $(NVCC)))
# every site directory of $(PYTHON) (the wheels may be installed --user)
PY_SITES := $(shell $(PYTHON) -c "import site, sysconfig; p = sysconfig.get_paths(); \
	print(' '.join(dict.fromkeys([p['purelib'], p['platlib']] + site.getsitepackages() + [site.getusersitepackages()])))" 2>/dev/null)
in_sites = $(foreach d,$(PY_SITES),$(d)/$(1))

# the first of the directories $(2) that holds a file matching $(1)
first_with = $(firstword $(foreach d,$(2),$(if $(wildcard $(d)/$(1)),$(d))))
# -lNAME when libNAME.so is there, else the versioned file itself (wheels ship only .so.N)
lib_flag = $(if $(wildcard $(1)/lib$(2).so),-l$(2),-l:$(notdir $(firstword $(wildcard $(1)/lib$(2).so.*))))

CUDA_LIBDIRS := $(CUDA_HOME)/lib64 $(CUDA_HOME)/targets/x86_64-linux/lib $(CUDA_HOME)/lib
CUDART_DIR := $(call first_with,libcudart.so*,$(CUDA_LIBDIRS))
CUBLAS_INC := $(call first_with,cublasLt.h,$(CUDA_HOME)/include $(call in_sites,nvidia/cu13/include) \
	$(call in_sites,nvidia/cublas/include))
CUBLAS_DIR := $(call first_with,libcublasLt.so*,$(CUDA_LIBDIRS) $(call in_sites,nvidia/cu13/lib) \
	$(call in_sites,nvidia/cublas/lib))
NCCL_INC := $(call first_with,nccl.h,$(CUDA_HOME)/include /usr/include /usr/local/include \
	$(call in_sites,nvidia/nccl/include) $(call in_sites,nvidia/cu13/include))
NCCL_DIR := $(call first_with,libnccl.so*,$(CUDA_LIBDIRS) /usr/lib/x86_64-linux-gnu /usr/local/lib /usr/lib64 \
	$(call in_sites,nvidia/nccl/lib) $(call in_sites,nvidia/cu13/lib))

# sm_90 machine code plus PTX that newer GPUs (and sm_80+) can JIT
CUDA_ARCH ?= -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=compute_80
NVCCFLAGS = -O3 -std=c++17 $(CUDA_ARCH) -Xcompiler -fPIC,-fopenmp,-Wall,-Wextra \
	$(addprefix -I,$(sort $(CUBLAS_INC) $(NCCL_INC)))
CUDA_LIBDIR_SET := $(sort $(CUDART_DIR) $(CUBLAS_DIR) $(NCCL_DIR))
CUDA_LDLIBS = $(addprefix -L,$(CUDA_LIBDIR_SET)) $(addprefix -Wl$(comma)-rpath$(comma),$(CUDA_LIBDIR_SET)) \
	-lcudart $(call lib_flag,$(CUBLAS_DIR),cublasLt) $(call lib_flag,$(CUBLAS_DIR),cublas) \
	$(call lib_flag,$(NCCL_DIR),nccl) -lgomp -lstdc++ -lm
comma := ,

all: train_gpt_cu gpt_cuda$(EXT) gpt_cuda_fp32$(EXT) build/libkernel_bench.so build/train_gpt_cu.ptx

cuda-check-deps:
	@test -n "$(CUBLAS_INC)" -a -n "$(CUBLAS_DIR)" || { echo "cuda.mk: cuBLAS not found (CUDA toolkit or pip install nvidia-cublas)"; exit 1; }
	@test -n "$(NCCL_INC)" -a -n "$(NCCL_DIR)" || { echo "cuda.mk: NCCL not found (CUDA toolkit, libnccl-dev or pip install nvidia-nccl-cu13)"; exit 1; }

build/train_gpt_cu.o: train_gpt.cu common.h gpt.h | cuda-check-deps
	@mkdir -p build
	$(NVCC) $(NVCCFLAGS) -c train_gpt.cu -o $@

build/train_gpt_cu_fp32.o: train_gpt.cu common.h gpt.h | cuda-check-deps
	@mkdir -p build
	$(NVCC) $(NVCCFLAGS) -DGPT_FP32 -c train_gpt.cu -o $@

build/train_gpt_cu_main.o: train_gpt.cu common.h gpt.h | cuda-check-deps
	@mkdir -p build
	$(NVCC) $(NVCCFLAGS) -DTRAIN_GPT_MAIN -c train_gpt.cu -o $@

# the device code of build/train_gpt_cu.o (bf16) as PTX: the same flags, for the virtual architecture
# that its sm_90 machine code is compiled from (-ptx takes one architecture)
CUDA_PTX_ARCH ?= -arch=compute_90
build/train_gpt_cu.ptx: train_gpt.cu common.h gpt.h | cuda-check-deps
	@mkdir -p build
	$(NVCC) -O3 -std=c++17 $(CUDA_PTX_ARCH) $(addprefix -I,$(sort $(CUBLAS_INC) $(NCCL_INC))) -ptx train_gpt.cu -o $@

build/kernel_bench.o: dev/kernel_bench.cu train_gpt.cu common.h gpt.h | cuda-check-deps
	@mkdir -p build
	$(NVCC) $(NVCCFLAGS) -c dev/kernel_bench.cu -o $@

build/libkernel_bench.so: build/kernel_bench.o
	$(CC) -shared $^ -o $@ $(CUDA_LDLIBS)

train_gpt_cu: build/train_gpt_cu_main.o
	$(CC) -fopenmp $^ -o $@ $(CUDA_LDLIBS)

build/gpt_cuda.c: gpt.pyx gpt.h .requirements.stamp
	@mkdir -p build
	$(PYTHON) -m cython -3 --module-name gpt_cuda gpt.pyx -o $@

build/gpt_cuda_fp32.c: gpt.pyx gpt.h .requirements.stamp
	@mkdir -p build
	$(PYTHON) -m cython -3 --module-name gpt_cuda_fp32 gpt.pyx -o $@

gpt_cuda$(EXT): build/gpt_cuda.c build/train_gpt_cu.o
	$(CC) $(CFLAGS) -Wno-unused-parameter -Wno-unused-function -shared -I. -I$(PYINC) -I$(NPINC) \
		-DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION $^ -o $@ $(CUDA_LDLIBS)

gpt_cuda_fp32$(EXT): build/gpt_cuda_fp32.c build/train_gpt_cu_fp32.o
	$(CC) $(CFLAGS) -Wno-unused-parameter -Wno-unused-function -shared -I. -I$(PYINC) -I$(NPINC) \
		-DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION $^ -o $@ $(CUDA_LDLIBS)

clean: clean-cuda
clean-cuda:
	rm -f train_gpt_cu gpt_cuda$(EXT) gpt_cuda_fp32$(EXT)

.PHONY: cuda-check-deps clean-cuda

endif

# builds, runs the GPU tests and the benchmark, writes gpu-check-results.txt
gpu-check:
	bash dev/gpu_check.sh

.PHONY: gpu-check

# the hand-written PTX kernels (asm/*.ptx): cubins embedded in build/ptx_kernels.h
-include asm/ptx.mk
