// The TopM searches' CPU kernels (invp_tf/kernels.py builds them, invp_tf/topm.py
// runs them on machines without a GPU or TPU, outside XLA; elsewhere TensorFlow ops
// compute the same):
// - InvpTopMask: the exact TopM set of [B, N] similarities (topm._exact_top_mask);
// - InvpListAbove: one bank chunk's similarities above a threshold as flat lists
//   (topm._list_entries, the chunked listing of large banks);
// - InvpListedTop: InvpTopMask's set over each row's listed entries, the kept ones
//   as flat lists (topm._exact_compact).
//
// InvpTopMask: the exact TopM set of every row as a [B, N] bool mask, one CPU pass per row.
//
// Row b of the output holds the k columns of tf.math.top_k(logits[b], k): the k
// largest values and, among columns tied at the k-th value, the lower column
// indices (top_k's rule); then column excluded[b] is cleared (when it is in
// 0..N-1). Rows with NaN: NaN ranks below every number, -inf included (among NaNs,
// the lower column first); TensorFlow's top_k has no consistent order for NaN, so
// there the set is this kernel's own.
//
// Per row: the k-th value is bracketed from a strided sample (every
// max(1, N / 2048)-th entry: 2,048 to 4,095 of them, or all of a shorter row),
// four standard deviations of the sample's rank error either side; one pass over
// the row marks the entries above the bracket and lists the ones inside it;
// std::nth_element finds the needed value among the listed ones, and a scan in
// column order takes those above it and, of those equal to it, the lowest columns.
// A row whose bracket misses (a collapsed or tied bank) is selected over all of its
// entries: the set never depends on the sample, only the cost does. Rows run in
// parallel on the CPU device's thread pool.
//
// InvpListedTop runs the same per-row selection (SelectRow) over each row's listed
// entries.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace invp_tf {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::TensorShapeUtils;
namespace shape_inference = ::tensorflow::shape_inference;

constexpr int64_t kSampleSize = 2048;

// NaN as -inf in the sample, which only places the bracket (std::nth_element needs a
// strict weak order; NaN has none).
inline float Key(float x) { return std::isnan(x) ? -INFINITY : x; }

struct Entry {
  float value;
  int64_t column;
};

// Before in (value descending, column ascending), NaN after every number: the order
// of top_k's output on numbers.
inline bool Before(const Entry& a, const Entry& b) {
  const bool a_nan = std::isnan(a.value), b_nan = std::isnan(b.value);
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a.value != b.value) return a.value > b.value;
  return a.column < b.column;
}

// The rank-th largest of values[0, end) (1-based rank), by partial selection in place.
float RankValue(std::vector<float>& values, int64_t rank, int64_t end) {
  std::nth_element(values.begin(), values.begin() + (rank - 1), values.begin() + end,
                   std::greater<float>());
  return values[rank - 1];
}

// Scratch space of one thread, reused across its rows.
struct Scratch {
  std::vector<float> sample;
  std::vector<float> values;    // the entries in the bracket, in column order
  std::vector<int32_t> columns;  // their columns
  std::vector<float> order;      // a copy of values, partially sorted
  std::vector<Entry> all;
};

// A row whose bracket missed: every entry ranked by (value, then column).
void SelectAll(const float* row, int64_t n, int64_t k, bool* out, std::vector<Entry>* all) {
  all->resize(n);
  for (int64_t j = 0; j < n; ++j) (*all)[j] = {row[j], j};
  std::nth_element(all->begin(), all->begin() + (k - 1), all->end(), Before);
  std::fill(out, out + n, false);
  for (int64_t i = 0; i < k; ++i) out[(*all)[i].column] = true;
}

void SelectRow(const float* row, int64_t n, int64_t k, bool* out, Scratch* scratch) {
  if (k >= n) {
    std::fill(out, out + n, true);
    return;
  }
  const int64_t stride = std::max<int64_t>(1, n / kSampleSize);
  const int64_t sample_size = (n + stride - 1) / stride;
  std::vector<float>& sample = scratch->sample;
  sample.resize(sample_size);
  for (int64_t i = 0; i < sample_size; ++i) sample[i] = Key(row[i * stride]);
  const int64_t rank = std::min<int64_t>(
      sample_size, std::max<int64_t>(1, std::llround(static_cast<double>(k) * sample_size / n)));
  const int64_t margin = static_cast<int64_t>(std::ceil(4.0 * std::sqrt(rank))) + 2;
  // Fewer than k entries above hi and at least k at or above lo, unless the sample
  // misled (checked below). The second selection runs over the first one's head.
  int64_t head = sample_size;
  float lo = -INFINITY, hi = INFINITY;
  if (rank + margin <= sample_size) {
    head = rank + margin;
    lo = RankValue(sample, head, sample_size);
  }
  if (rank > margin) hi = RankValue(sample, rank - margin, head);
  // One branch-free pass: mark and count the entries above hi, list those in
  // [lo, hi]. A NaN is in neither (every comparison with it is false); where that
  // leaves fewer than k candidates, the row is selected over all of its entries.
  scratch->values.resize(n);
  scratch->columns.resize(n);
  float* values = scratch->values.data();
  int32_t* columns = scratch->columns.data();
  int64_t above = 0, listed = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float x = row[j];
    const bool is_above = x > hi;
    out[j] = is_above;
    above += is_above;
    values[listed] = x;
    columns[listed] = static_cast<int32_t>(j);
    listed += (x >= lo) & (x <= hi);
  }
  const int64_t need = k - above;
  if (need < 1 || need > listed) {
    SelectAll(row, n, k, out, &scratch->all);
    return;
  }
  // The need-th largest listed value, then the listed entries above it and the
  // first (lowest-column) ones equal to it, up to need.
  scratch->order.assign(values, values + listed);
  const float cut = RankValue(scratch->order, need, listed);
  int64_t ties = need;
  for (int64_t i = 0; i < listed; ++i) ties -= values[i] > cut;
  for (int64_t i = 0; i < listed; ++i) {
    const bool take = values[i] > cut || (values[i] == cut && ties-- > 0);
    if (take) out[columns[i]] = true;
  }
}

class TopMaskOp : public OpKernel {
 public:
  explicit TopMaskOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("k", &k_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& logits = context->input(0);
    const Tensor& excluded = context->input(1);
    OP_REQUIRES(context, TensorShapeUtils::IsMatrix(logits.shape()),
                absl::InvalidArgumentError("InvpTopMask: logits must be [B, N], got " +
                                           logits.shape().DebugString()));
    const int64_t batch = logits.dim_size(0), n = logits.dim_size(1);
    OP_REQUIRES(context, n <= std::numeric_limits<int32_t>::max(),
                absl::InvalidArgumentError("InvpTopMask: more than 2^31 - 1 columns: " +
                                           std::to_string(n)));
    OP_REQUIRES(context,
                TensorShapeUtils::IsVector(excluded.shape()) && excluded.dim_size(0) == batch,
                absl::InvalidArgumentError("InvpTopMask: excluded must be [B] = [" +
                                           std::to_string(batch) + "], got " +
                                           excluded.shape().DebugString()));
    Tensor* mask = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, logits.shape(), &mask));
    if (batch == 0 || n == 0) return;
    const float* values = logits.flat<float>().data();
    const int32_t* skip = excluded.flat<int32_t>().data();
    bool* out = mask->flat<bool>().data();
    const int64_t k = k_;
    auto rows = [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t b = begin; b < end; ++b) {
        SelectRow(values + b * n, n, k, out + b * n, &scratch);
        if (skip[b] >= 0 && skip[b] < n) out[b * n + skip[b]] = false;
      }
    };
    const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(workers.num_threads, workers.workers, batch, /*cost_per_unit=*/n * 8,
                        rows);
  }

 private:
  int64_t k_;
};

REGISTER_OP("InvpTopMask")
    .Input("logits: float")
    .Input("excluded: int32")
    .Attr("k: int >= 1")
    .Output("mask: bool")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle logits, excluded;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &logits));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &excluded));
      c->set_output(0, logits);
      return absl::OkStatus();
    })
    .Doc("Row b: the k columns of tf.math.top_k(logits[b], k), minus column excluded[b].");

REGISTER_KERNEL_BUILDER(Name("InvpTopMask").Device(::tensorflow::DEVICE_CPU), TopMaskOp);

// InvpListAbove: the entries of one chunk of similarities above each row's threshold,
// as flat lists in row-major order (rows ascending, then columns ascending).
//
// logits [B, c], threshold [B], base [B] (entries listed for each row before this
// chunk), column_offset (the chunk's first bank row). Outputs, for the C entries with
// logits[b, j] > threshold[b] (NaN never is): row [C], column [C] = column_offset + j,
// value [C], position [C] (the entry's place among its row's, counting base), and
// count [B] = base + the row's entries in this chunk. Concatenated over chunks, each
// row's entries stay in column order. One read of the chunk, rows in parallel.
class ListAboveOp : public OpKernel {
 public:
  explicit ListAboveOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& logits = context->input(0);
    const Tensor& threshold = context->input(1);
    const Tensor& base = context->input(2);
    const Tensor& offset = context->input(3);
    OP_REQUIRES(context, TensorShapeUtils::IsMatrix(logits.shape()),
                absl::InvalidArgumentError("InvpListAbove: logits must be [B, c], got " +
                                           logits.shape().DebugString()));
    const int64_t batch = logits.dim_size(0), n = logits.dim_size(1);
    for (const Tensor* vector : {&threshold, &base}) {
      OP_REQUIRES(context,
                  TensorShapeUtils::IsVector(vector->shape()) && vector->dim_size(0) == batch,
                  absl::InvalidArgumentError(
                      "InvpListAbove: threshold and base must be [B] = [" +
                      std::to_string(batch) + "], got " + vector->shape().DebugString()));
    }
    OP_REQUIRES(context, TensorShapeUtils::IsScalar(offset.shape()),
                absl::InvalidArgumentError("InvpListAbove: column_offset must be a scalar"));
    const int64_t first_column = offset.scalar<int32_t>()();
    OP_REQUIRES(context,
                first_column >= 0 && first_column + n <= std::numeric_limits<int32_t>::max(),
                absl::InvalidArgumentError("InvpListAbove: columns out of int32 range"));
    const float* x = logits.flat<float>().data();
    const float* t = threshold.flat<float>().data();
    const int32_t* before = base.flat<int32_t>().data();
    for (int64_t b = 0; b < batch; ++b) {
      OP_REQUIRES(context,
                  before[b] >= 0 && before[b] <= std::numeric_limits<int32_t>::max() - n,
                  absl::InvalidArgumentError("InvpListAbove: base out of range: " +
                                             std::to_string(before[b])));
    }
    // Pass 1: each row's listed columns, kept per row (a small fraction of the chunk).
    std::vector<std::vector<int32_t>> listed(batch);
    auto collect = [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const float* row = x + b * n;
        const float cut = t[b];
        std::vector<int32_t>& out = listed[b];
        for (int64_t j = 0; j < n; ++j) {
          if (row[j] > cut) out.push_back(static_cast<int32_t>(j));
        }
      }
    };
    const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(workers.num_threads, workers.workers, batch, /*cost_per_unit=*/n * 2,
                        collect);
    std::vector<int64_t> start(batch + 1, 0);
    for (int64_t b = 0; b < batch; ++b) start[b + 1] = start[b] + listed[b].size();
    const int64_t total = start[batch];
    Tensor *row_out = nullptr, *column_out = nullptr, *value_out = nullptr,
           *position_out = nullptr, *count_out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({total}), &row_out));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({total}), &column_out));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({total}), &value_out));
    OP_REQUIRES_OK(context, context->allocate_output(3, TensorShape({total}), &position_out));
    OP_REQUIRES_OK(context, context->allocate_output(4, TensorShape({batch}), &count_out));
    int32_t* rows = row_out->flat<int32_t>().data();
    int32_t* columns = column_out->flat<int32_t>().data();
    float* values = value_out->flat<float>().data();
    int32_t* positions = position_out->flat<int32_t>().data();
    int32_t* count = count_out->flat<int32_t>().data();
    // Pass 2: each row's entries copied to its place in the flat lists.
    auto place = [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const std::vector<int32_t>& in = listed[b];
        const int64_t size = in.size();
        for (int64_t i = 0; i < size; ++i) {
          const int64_t p = start[b] + i;
          rows[p] = static_cast<int32_t>(b);
          columns[p] = static_cast<int32_t>(first_column + in[i]);
          values[p] = x[b * n + in[i]];
          positions[p] = static_cast<int32_t>(before[b] + i);
        }
        count[b] = static_cast<int32_t>(before[b] + size);
      }
    };
    ::tensorflow::Shard(workers.num_threads, workers.workers, batch,
                        /*cost_per_unit=*/std::max<int64_t>(1, total / std::max<int64_t>(1, batch)) * 4,
                        place);
  }
};

REGISTER_OP("InvpListAbove")
    .Input("logits: float")
    .Input("threshold: float")
    .Input("base: int32")
    .Input("column_offset: int32")
    .Output("row: int32")
    .Output("column: int32")
    .Output("value: float")
    .Output("position: int32")
    .Output("count: int32")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle logits, vector;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &logits));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &vector));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &vector));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &vector));
      for (int i = 0; i < 4; ++i) c->set_output(i, c->Vector(c->UnknownDim()));
      c->set_output(4, c->Vector(c->Dim(logits, 0)));
      return absl::OkStatus();
    })
    .Doc("The entries of logits [B, c] above threshold[b], row-major flat lists.");

REGISTER_KERNEL_BUILDER(Name("InvpListAbove").Device(::tensorflow::DEVICE_CPU), ListAboveOp);

// InvpListedTop: InvpTopMask on flat lists, returning the kept entries. Per row, the
// k largest of its listed values, among ties the lower position (positions in column
// order, as InvpListAbove gives them: top_k's lower column), then the entry at column
// excluded[b] dropped.
//
// value [C], row [C] (each in 0..B-1), column [C], position [C] (the entry's place
// among its row's: 0..count[row]-1, each once), count [B] (they sum to C), excluded
// [B]. Outputs the kept entries' row, column and value, row-major (rows ascending,
// then positions ascending). A row with at most k entries keeps them all (but the
// excluded one).
class ListedTopOp : public OpKernel {
 public:
  explicit ListedTopOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("k", &k_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& value = context->input(0);
    const Tensor& row = context->input(1);
    const Tensor& column = context->input(2);
    const Tensor& position = context->input(3);
    const Tensor& count = context->input(4);
    const Tensor& excluded = context->input(5);
    OP_REQUIRES(context,
                TensorShapeUtils::IsVector(value.shape()) && value.shape() == row.shape() &&
                    value.shape() == column.shape() && value.shape() == position.shape(),
                absl::InvalidArgumentError(
                    "InvpListedTop: value, row, column and position must be [C], got " +
                    value.shape().DebugString() + ", " + row.shape().DebugString() + ", " +
                    column.shape().DebugString() + " and " + position.shape().DebugString()));
    OP_REQUIRES(context,
                TensorShapeUtils::IsVector(count.shape()) && excluded.shape() == count.shape(),
                absl::InvalidArgumentError("InvpListedTop: count and excluded must be [B], got " +
                                           count.shape().DebugString() + " and " +
                                           excluded.shape().DebugString()));
    const int64_t total = value.dim_size(0), batch = count.dim_size(0);
    const float* values = value.flat<float>().data();
    const int32_t* rows = row.flat<int32_t>().data();
    const int32_t* columns = column.flat<int32_t>().data();
    const int32_t* positions = position.flat<int32_t>().data();
    const int32_t* counts = count.flat<int32_t>().data();
    const int32_t* skip = excluded.flat<int32_t>().data();
    std::vector<int64_t> start(batch + 1, 0);
    for (int64_t b = 0; b < batch; ++b) {
      OP_REQUIRES(context, counts[b] >= 0,
                  absl::InvalidArgumentError("InvpListedTop: a negative count"));
      start[b + 1] = start[b] + counts[b];
    }
    OP_REQUIRES(context, start[batch] == total,
                absl::InvalidArgumentError("InvpListedTop: count sums to " +
                                           std::to_string(start[batch]) + ", not C = " +
                                           std::to_string(total)));
    // Each row's entry indices in its listed order: entry i goes to its row's start
    // plus its position. An entry out of range, or two at one place (which leaves
    // another place unfilled, -1), is an error.
    std::vector<int64_t> order(total, -1);
    for (int64_t i = 0; i < total; ++i) {
      const int32_t b = rows[i];
      OP_REQUIRES(context,
                  b >= 0 && b < batch && positions[i] >= 0 && positions[i] < counts[b],
                  absl::InvalidArgumentError(
                      "InvpListedTop: an entry's row or position is out of range"));
      order[start[b] + positions[i]] = i;
    }
    OP_REQUIRES(context, std::find(order.begin(), order.end(), -1) == order.end(),
                absl::InvalidArgumentError("InvpListedTop: two entries at one position"));
    const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
    // Per row, the flat indices of its kept entries (in place in `order`), and how many.
    std::vector<int64_t> kept(batch, 0);
    const int64_t k = k_;
    auto select = [&](int64_t begin, int64_t end) {
      Scratch scratch;
      std::vector<float> listed;
      std::unique_ptr<bool[]> out;
      int64_t capacity = 0;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = start[b + 1] - start[b];
        int64_t* index = order.data() + start[b];
        listed.resize(n);
        if (n > capacity) {
          capacity = n;
          out.reset(new bool[capacity]);
        }
        for (int64_t j = 0; j < n; ++j) listed[j] = values[index[j]];
        SelectRow(listed.data(), n, k, out.get(), &scratch);
        int64_t size = 0;
        for (int64_t j = 0; j < n; ++j) {
          if (out[j] && columns[index[j]] != skip[b]) index[size++] = index[j];
        }
        kept[b] = size;
      }
    };
    const int64_t per_row = std::max<int64_t>(1, total / std::max<int64_t>(1, batch));
    ::tensorflow::Shard(workers.num_threads, workers.workers, batch, per_row * 8, select);
    std::vector<int64_t> first(batch + 1, 0);
    for (int64_t b = 0; b < batch; ++b) first[b + 1] = first[b] + kept[b];
    Tensor *row_out = nullptr, *column_out = nullptr, *value_out = nullptr;
    const TensorShape shape({first[batch]});
    OP_REQUIRES_OK(context, context->allocate_output(0, shape, &row_out));
    OP_REQUIRES_OK(context, context->allocate_output(1, shape, &column_out));
    OP_REQUIRES_OK(context, context->allocate_output(2, shape, &value_out));
    int32_t* row_kept = row_out->flat<int32_t>().data();
    int32_t* column_kept = column_out->flat<int32_t>().data();
    float* value_kept = value_out->flat<float>().data();
    auto gather = [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t* index = order.data() + start[b];
        for (int64_t j = 0; j < kept[b]; ++j) {
          row_kept[first[b] + j] = static_cast<int32_t>(b);
          column_kept[first[b] + j] = columns[index[j]];
          value_kept[first[b] + j] = values[index[j]];
        }
      }
    };
    ::tensorflow::Shard(workers.num_threads, workers.workers, batch, per_row * 2, gather);
  }

 private:
  int64_t k_;
};

REGISTER_OP("InvpListedTop")
    .Input("value: float")
    .Input("row: int32")
    .Input("column: int32")
    .Input("position: int32")
    .Input("count: int32")
    .Input("excluded: int32")
    .Attr("k: int >= 1")
    .Output("kept_row: int32")
    .Output("kept_column: int32")
    .Output("kept_value: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle vector;
      for (int i = 0; i < 6; ++i) TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 1, &vector));
      for (int i = 0; i < 3; ++i) c->set_output(i, c->Vector(c->UnknownDim()));
      return absl::OkStatus();
    })
    .Doc("Per row of flat lists: its k largest values (ties to the earlier entry), "
         "but the excluded column; the kept entries, row-major.");

REGISTER_KERNEL_BUILDER(Name("InvpListedTop").Device(::tensorflow::DEVICE_CPU), ListedTopOp);

}  // namespace
}  // namespace invp_tf
