// vmem's native transfer engine: a plain C ABI over the CUDA runtime, loaded with ctypes.
//
// - a pinned host arena: a few large cudaHostAlloc blocks carved by a best-fit allocator
//   with coalescing, statistics and trim (plain aligned host memory when pinned == 0, so
//   the allocator also runs, and is tested, on machines without a GPU);
// - asynchronous copies on caller-given streams (raw cudaStream_t handles from torch),
//   completion events, and a batched copy of many small buffers in one call;
// - zero-value compression (the cDMA idea): a bitmask of the non-zero elements and the
//   non-zero elements packed in order; the format is written down in
//   vmem/transfer/compression.py, whose CPU reference produces the same bytes.
//
// Every function returns a cudaError_t code (0 is success); results go through pointers.
// No C++ exception crosses the ABI.

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <vector>

namespace {

constexpr int kAbiVersion = 2;
constexpr size_t kAlign = 512;  // every arena allocation starts on this boundary

size_t aligned(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// ---------------------------------------------------------------------------------------
// Pinned host arena

struct Block {
  char* base;
  size_t size;
};

struct FreeRange {
  size_t size;
  size_t block;  // ranges coalesce only within one block
};

struct UsedRange {
  size_t size;
  size_t block;
};

}  // namespace

extern "C" {

typedef struct {
  uint64_t reserved;          // bytes in blocks
  uint64_t in_use;            // bytes handed out and not freed
  uint64_t peak_in_use;
  uint64_t blocks;            // blocks held now
  uint64_t block_allocations; // cudaHostAlloc (or aligned_alloc) calls in all
  uint64_t allocations;
  uint64_t frees;
  uint64_t reuses;            // allocations served without a new block
} vmem_arena_stats;

}  // extern "C"

namespace {

struct Arena {
  std::mutex mu;
  size_t block_bytes;
  bool pinned;
  std::vector<Block> blocks;  // a freed block leaves {nullptr, 0} so indices stay valid
  std::map<char*, FreeRange> free_ranges;
  std::map<char*, UsedRange> used;
  vmem_arena_stats stats{};

  cudaError_t grow(size_t size, size_t* index) {
    size = aligned(size > block_bytes ? size : block_bytes);
    void* base = nullptr;
    if (pinned) {
      cudaError_t err = cudaHostAlloc(&base, size, cudaHostAllocPortable | cudaHostAllocMapped);
      if (err != cudaSuccess) return err;
    } else {
      base = std::aligned_alloc(kAlign, size);
      if (base == nullptr) return cudaErrorMemoryAllocation;
    }
    blocks.push_back({static_cast<char*>(base), size});
    *index = blocks.size() - 1;
    free_ranges[static_cast<char*>(base)] = {size, *index};
    stats.reserved += size;
    stats.blocks += 1;
    stats.block_allocations += 1;
    return cudaSuccess;
  }

  cudaError_t alloc(size_t nbytes, void** out) {
    size_t size = aligned(nbytes ? nbytes : 1);
    auto best = free_ranges.end();
    for (auto it = free_ranges.begin(); it != free_ranges.end(); ++it) {
      if (it->second.size >= size && (best == free_ranges.end() ||
                                      it->second.size < best->second.size)) {
        best = it;
      }
    }
    if (best == free_ranges.end()) {
      size_t index;
      cudaError_t err = grow(size, &index);
      if (err != cudaSuccess) return err;
      best = free_ranges.find(blocks[index].base);
    } else {
      stats.reuses += 1;
    }
    char* start = best->first;
    FreeRange range = best->second;
    free_ranges.erase(best);
    if (range.size > size) free_ranges[start + size] = {range.size - size, range.block};
    used[start] = {size, range.block};
    stats.allocations += 1;
    stats.in_use += size;
    if (stats.in_use > stats.peak_in_use) stats.peak_in_use = stats.in_use;
    *out = start;
    return cudaSuccess;
  }

  cudaError_t release(void* ptr) {
    auto it = used.find(static_cast<char*>(ptr));
    if (it == used.end()) return cudaErrorInvalidValue;
    char* start = it->first;
    UsedRange range = it->second;
    used.erase(it);
    stats.frees += 1;
    stats.in_use -= range.size;
    size_t size = range.size;
    auto next = free_ranges.find(start + size);
    if (next != free_ranges.end() && next->second.block == range.block) {
      size += next->second.size;
      free_ranges.erase(next);
    }
    auto prev = free_ranges.lower_bound(start);
    if (prev != free_ranges.begin()) {
      --prev;
      if (prev->first + prev->second.size == start && prev->second.block == range.block) {
        prev->second.size += size;
        return cudaSuccess;
      }
    }
    free_ranges[start] = {size, range.block};
    return cudaSuccess;
  }

  // Give back every block nothing is allocated from.
  cudaError_t trim() {
    for (size_t i = 0; i < blocks.size(); ++i) {
      Block& block = blocks[i];
      if (block.base == nullptr) continue;
      auto it = free_ranges.find(block.base);
      if (it == free_ranges.end() || it->second.size != block.size) continue;
      free_ranges.erase(it);
      cudaError_t err = drop(block);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }

  cudaError_t drop(Block& block) {
    cudaError_t err = cudaSuccess;
    if (pinned) {
      err = cudaFreeHost(block.base);
    } else {
      std::free(block.base);
    }
    stats.reserved -= block.size;
    stats.blocks -= 1;
    block = {nullptr, 0};
    return err;
  }
};

// ---------------------------------------------------------------------------------------
// Zero-value compression kernels
//
// A thread block of kWarps warps owns kChunkWords consecutive 32-element mask words; warp w
// owns its kWordsPerWarp words, lane l of the warp word j's element l. Elements compare as
// bit patterns: only all-zero bits count as zero (so -0.0 and NaN payloads survive).

constexpr int kWarps = 8;
constexpr int kWordsPerWarp = 32;
constexpr int kChunkWords = kWarps * kWordsPerWarp;  // 8192 elements per thread block
constexpr int kThreads = kWarps * 32;
constexpr size_t kHeaderBytes = 64;
constexpr uint32_t kMagic = 0x435A4D56;  // "VMZC" little-endian
constexpr uint32_t kFormatVersion = 1;

__host__ __device__ size_t mask_words(size_t numel) { return (numel + 31) / 32; }
__host__ __device__ size_t chunks(size_t numel) { return (mask_words(numel) + kChunkWords - 1) / kChunkWords; }
__host__ __device__ size_t values_offset(size_t numel) {
  return kHeaderBytes + (mask_words(numel) * 4 + 15) / 16 * 16;
}

// The chunk's count from each warp's (held by its lane 0); every thread of the block calls it.
__device__ void store_chunk_count(uint32_t count, unsigned long long* chunk_counts) {
  __shared__ uint32_t warp_counts[kWarps];
  if (threadIdx.x % 32 == 0) warp_counts[threadIdx.x / 32] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total = 0;
    for (int k = 0; k < kWarps; ++k) total += warp_counts[k];
    chunk_counts[blockIdx.x] = total;
  }
}

// Mask words and the number of non-zeros per chunk.
template <typename T>
__global__ void mask_kernel(const T* __restrict__ src, size_t numel, uint32_t* mask,
                            unsigned long long* chunk_counts) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t words = mask_words(numel);
  const size_t first = (size_t)blockIdx.x * kChunkWords + (size_t)warp * kWordsPerWarp;
  uint32_t count = 0;
  for (int j = 0; j < kWordsPerWarp; ++j) {
    const size_t w = first + j;  // the same for every lane: the break is warp-uniform
    if (w >= words) break;
    const size_t i = w * 32 + lane;
    const uint32_t bits = __ballot_sync(0xffffffffu, i < numel && src[i] != T(0));
    if (lane == 0) mask[w] = bits;
    count += __popc(bits);
  }
  store_chunk_count(count, chunk_counts);
}

// The number of non-zeros per chunk, from a mask.
__global__ void count_kernel(const uint32_t* __restrict__ mask, size_t words,
                             unsigned long long* chunk_counts) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t w = (size_t)blockIdx.x * kChunkWords + (size_t)warp * kWordsPerWarp + lane;
  uint32_t count = w < words ? __popc(mask[w]) : 0;
  for (int delta = 16; delta > 0; delta /= 2) count += __shfl_down_sync(0xffffffffu, count, delta);
  store_chunk_count(count, chunk_counts);
}

// Exclusive scan of the chunk counts in place, by one thread block of 1024 threads; the
// total goes to *total (and, with the rest of the header, to header when given).
__global__ void scan_kernel(unsigned long long* counts, size_t n, unsigned long long* total,
                            unsigned char* header, uint32_t elem_size, size_t numel) {
  __shared__ unsigned long long sums[1024];
  const size_t per = (n + blockDim.x - 1) / blockDim.x;
  const size_t begin = threadIdx.x * per;
  const size_t end = begin + per < n ? begin + per : n;
  unsigned long long sum = 0;
  for (size_t i = begin; i < end; ++i) sum += counts[i];
  sums[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long running = 0;
    for (unsigned k = 0; k < blockDim.x; ++k) {
      const unsigned long long s = sums[k];
      sums[k] = running;
      running += s;
    }
    *total = running;
    if (header != nullptr) {
      uint32_t* words = reinterpret_cast<uint32_t*>(header);
      words[0] = kMagic;
      words[1] = kFormatVersion;
      words[2] = elem_size;
      words[3] = 0;
      unsigned long long* longs = reinterpret_cast<unsigned long long*>(header + 16);
      longs[0] = numel;
      longs[1] = running;
      for (int k = 2; k < 6; ++k) longs[k] = 0;
    }
  }
  __syncthreads();
  unsigned long long running = sums[threadIdx.x];
  for (size_t i = begin; i < end; ++i) {
    const unsigned long long c = counts[i];
    counts[i] = running;
    running += c;
  }
}

// Where each lane's word starts among its chunk's packed values: the chunk's offset plus the
// words before it in the chunk. Every lane of the block must call it.
__device__ unsigned long long word_offset(uint32_t bits, const unsigned long long* chunk_offsets,
                                          uint32_t* warp_totals) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t inclusive = __popc(bits);
  for (int delta = 1; delta < 32; delta *= 2) {
    const uint32_t up = __shfl_up_sync(0xffffffffu, inclusive, delta);
    if (lane >= delta) inclusive += up;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  uint32_t before = 0;
  for (int k = 0; k < warp; ++k) before += warp_totals[k];
  return chunk_offsets[blockIdx.x] + before + inclusive - __popc(bits);
}

// Packs the non-zeros of src into values and copies the mask next to them in out_mask.
template <typename T>
__global__ void pack_kernel(const T* __restrict__ src, size_t numel,
                            const uint32_t* __restrict__ mask,
                            const unsigned long long* __restrict__ chunk_offsets,
                            uint32_t* out_mask, T* values) {
  __shared__ uint32_t warp_totals[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t words = mask_words(numel);
  const size_t first = (size_t)blockIdx.x * kChunkWords + (size_t)warp * kWordsPerWarp;
  const uint32_t my_bits = first + lane < words ? mask[first + lane] : 0u;
  // The mask's zero padding up to the values' 16-byte boundary too (in the last chunk: a
  // chunk is a multiple of 4 words), so every byte before the values is defined.
  if (first + lane < (words + 3) / 4 * 4) out_mask[first + lane] = my_bits;
  const unsigned long long my_offset = word_offset(my_bits, chunk_offsets, warp_totals);
  for (int j = 0; j < kWordsPerWarp; ++j) {
    const uint32_t bits = __shfl_sync(0xffffffffu, my_bits, j);
    const unsigned long long offset = __shfl_sync(0xffffffffu, my_offset, j);
    if (bits & (1u << lane)) {
      values[offset + __popc(bits & ((1u << lane) - 1u))] = src[(first + j) * 32 + lane];
    }
  }
}

// Scatters packed values back into a dense dst; every element of dst is written.
template <typename T>
__global__ void unpack_kernel(const T* __restrict__ values, size_t numel,
                              const uint32_t* __restrict__ mask,
                              const unsigned long long* __restrict__ chunk_offsets, T* dst) {
  __shared__ uint32_t warp_totals[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t words = mask_words(numel);
  const size_t first = (size_t)blockIdx.x * kChunkWords + (size_t)warp * kWordsPerWarp;
  const uint32_t my_bits = first + lane < words ? mask[first + lane] : 0u;
  const unsigned long long my_offset = word_offset(my_bits, chunk_offsets, warp_totals);
  for (int j = 0; j < kWordsPerWarp; ++j) {
    const uint32_t bits = __shfl_sync(0xffffffffu, my_bits, j);
    const unsigned long long offset = __shfl_sync(0xffffffffu, my_offset, j);
    const size_t i = (first + j) * 32 + lane;
    if (i < numel) {
      dst[i] = (bits & (1u << lane)) ? values[offset + __popc(bits & ((1u << lane) - 1u))]
                                     : T(0);
    }
  }
}

struct Workspace {
  uint32_t* mask;
  unsigned long long* counts;
  unsigned long long* total;
};

// Workspace layout: the chunk counts and the total, then (compress only) the mask.
size_t counts_bytes(size_t numel) { return (chunks(numel) * 8 + 8 + 15) / 16 * 16; }

Workspace carve(void* workspace, size_t numel) {
  char* base = static_cast<char*>(workspace);
  return {reinterpret_cast<uint32_t*>(base + counts_bytes(numel)),
          reinterpret_cast<unsigned long long*>(base),
          reinterpret_cast<unsigned long long*>(base + chunks(numel) * 8)};
}

template <typename T>
cudaError_t compress(const void* src, size_t numel, void* out, void* workspace,
                     cudaStream_t stream) {
  const Workspace ws = carve(workspace, numel);
  const size_t n = chunks(numel);
  unsigned char* header = static_cast<unsigned char*>(out);
  if (n == 0) {
    scan_kernel<<<1, 1024, 0, stream>>>(ws.counts, 0, ws.total, header, sizeof(T), numel);
    return cudaGetLastError();
  }
  mask_kernel<T><<<n, kThreads, 0, stream>>>(static_cast<const T*>(src), numel, ws.mask,
                                             ws.counts);
  scan_kernel<<<1, 1024, 0, stream>>>(ws.counts, n, ws.total, header, sizeof(T), numel);
  pack_kernel<T><<<n, kThreads, 0, stream>>>(
      static_cast<const T*>(src), numel, ws.mask, ws.counts,
      reinterpret_cast<uint32_t*>(header + kHeaderBytes),
      reinterpret_cast<T*>(header + values_offset(numel)));
  return cudaGetLastError();
}

template <typename T>
cudaError_t decompress(const void* in, size_t numel, void* dst, void* workspace,
                       cudaStream_t stream) {
  const Workspace ws = carve(workspace, numel);
  const size_t n = chunks(numel);
  if (n == 0) return cudaSuccess;
  const unsigned char* base = static_cast<const unsigned char*>(in);
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(base + kHeaderBytes);
  count_kernel<<<n, kThreads, 0, stream>>>(mask, mask_words(numel), ws.counts);
  scan_kernel<<<1, 1024, 0, stream>>>(ws.counts, n, ws.total, nullptr, sizeof(T), numel);
  unpack_kernel<T><<<n, kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(base + values_offset(numel)), numel, mask, ws.counts,
      static_cast<T*>(dst));
  return cudaGetLastError();
}

}  // namespace

extern "C" {

int vmem_abi_version(void) { return kAbiVersion; }

const char* vmem_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

const char* vmem_error_name(int code) { return cudaGetErrorName((cudaError_t)code); }

int vmem_device_count(int* count) {
  *count = 0;
  return cudaGetDeviceCount(count);
}

// -- arena -------------------------------------------------------------------------------

int vmem_arena_create(size_t block_bytes, int pinned, void** arena) {
  Arena* a = new (std::nothrow) Arena();
  if (a == nullptr) return cudaErrorMemoryAllocation;
  a->block_bytes = aligned(block_bytes ? block_bytes : 1);
  a->pinned = pinned != 0;
  *arena = a;
  return cudaSuccess;
}

int vmem_arena_alloc(void* arena, size_t nbytes, void** out) {
  Arena* a = static_cast<Arena*>(arena);
  try {
    std::lock_guard<std::mutex> lock(a->mu);
    return a->alloc(nbytes, out);
  } catch (...) {  // std::bad_alloc from the maps: no exception crosses the C ABI
    return cudaErrorMemoryAllocation;
  }
}

int vmem_arena_free(void* arena, void* ptr) {
  Arena* a = static_cast<Arena*>(arena);
  try {
    std::lock_guard<std::mutex> lock(a->mu);
    return a->release(ptr);
  } catch (...) {
    return cudaErrorMemoryAllocation;
  }
}

int vmem_arena_trim(void* arena) {
  Arena* a = static_cast<Arena*>(arena);
  std::lock_guard<std::mutex> lock(a->mu);
  return a->trim();
}

int vmem_arena_stats_get(void* arena, vmem_arena_stats* stats) {
  Arena* a = static_cast<Arena*>(arena);
  std::lock_guard<std::mutex> lock(a->mu);
  *stats = a->stats;
  return cudaSuccess;
}

// Frees every block, allocated from or not: the caller guarantees nothing uses them.
int vmem_arena_destroy(void* arena) {
  Arena* a = static_cast<Arena*>(arena);
  cudaError_t first = cudaSuccess;
  for (Block& block : a->blocks) {
    if (block.base == nullptr) continue;
    cudaError_t err = a->drop(block);
    if (first == cudaSuccess) first = err;
  }
  delete a;
  return first;
}

// -- copies and events -------------------------------------------------------------------

int vmem_copy_async(void* dst, const void* src, size_t nbytes, void* stream) {
  return cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDefault, (cudaStream_t)stream);
}

// count copies in one call, in order, on one stream; stops at the first error.
int vmem_copy_batch(void* const* dsts, const void* const* srcs, const size_t* sizes,
                    size_t count, void* stream) {
  for (size_t i = 0; i < count; ++i) {
    cudaError_t err = cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault,
                                      (cudaStream_t)stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

int vmem_event_create(void** event) {
  return cudaEventCreateWithFlags(reinterpret_cast<cudaEvent_t*>(event),
                                  cudaEventDisableTiming);
}

int vmem_event_record(void* event, void* stream) {
  return cudaEventRecord((cudaEvent_t)event, (cudaStream_t)stream);
}

int vmem_stream_wait_event(void* stream, void* event) {
  return cudaStreamWaitEvent((cudaStream_t)stream, (cudaEvent_t)event, 0);
}

int vmem_event_synchronize(void* event) { return cudaEventSynchronize((cudaEvent_t)event); }

int vmem_event_destroy(void* event) { return cudaEventDestroy((cudaEvent_t)event); }

// -- zero-value compression --------------------------------------------------------------

// Bytes of device workspace compress needs for numel elements (the mask and chunk counts).
size_t vmem_compress_workspace_bytes(size_t numel) {
  return counts_bytes(numel) + mask_words(numel) * 4;
}

// Bytes of device workspace decompress needs: the chunk counts only (8 bytes per 8192
// elements), as it reads the mask where the buffer is.
size_t vmem_decompress_workspace_bytes(size_t numel) { return counts_bytes(numel); }

}  // extern "C"

namespace {

// Misaligned element access would be a sticky error that ends the whole CUDA context.
bool misaligned(const void* p, size_t align) {
  return reinterpret_cast<uintptr_t>(p) % align != 0;
}

// Calls run(T{}) with T the unsigned integer of elem_size bytes, after checking that the
// packed buffer and the workspace are 16-byte aligned and the dense tensor element-aligned.
template <typename Run>
cudaError_t by_element_size(int elem_size, const void* packed, const void* workspace,
                            const void* dense, Run run) {
  if (misaligned(packed, 16) || misaligned(workspace, 16)) return cudaErrorInvalidValue;
  switch (elem_size) {
    case 1: return run(uint8_t{});
    case 2: return misaligned(dense, 2) ? cudaErrorInvalidValue : run(uint16_t{});
    case 4: return misaligned(dense, 4) ? cudaErrorInvalidValue : run(uint32_t{});
    case 8: return misaligned(dense, 8) ? cudaErrorInvalidValue : run(uint64_t{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" {

// Compresses numel elements of elem_size bytes from device memory src into out: device
// memory, or mapped pinned host memory (the kernels then write across the link directly,
// only the header, mask and non-zeros). out must hold the compressed size at full density
// (vmem/transfer/compression.py: compressed_nbytes(numel, elem_size, numel)); the header's
// non-zero count says how many of those bytes are used.
int vmem_compress(const void* src, size_t numel, int elem_size, void* out, void* workspace,
                  void* stream) {
  return by_element_size(elem_size, out, workspace, src, [&](auto element) {
    return compress<decltype(element)>(src, numel, out, workspace, (cudaStream_t)stream);
  });
}

// Decompresses in -- device memory, or the mapped pinned host memory compress wrote: the
// kernels then read across the link directly, and only the mask and non-zeros cross it --
// into dense device memory dst.
int vmem_decompress(const void* in, size_t numel, int elem_size, void* dst, void* workspace,
                    void* stream) {
  return by_element_size(elem_size, in, workspace, dst, [&](auto element) {
    return decompress<decltype(element)>(in, numel, dst, workspace, (cudaStream_t)stream);
  });
}

}  // extern "C"
