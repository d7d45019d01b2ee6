// A small .npy reader/writer (format versions 1.0-3.0, C order, little-endian):
// float32 '<f4', float64 '<f8', int64 '<i8', int32 '<i4', bool '|b1', uint8 '|u1'.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace npy {

enum class DType { Float32, Float64, Int64, Int32, Bool, UInt8 };

struct Array {
  DType dtype = DType::Float32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;  // raw little-endian bytes, C order

  int64_t size() const;
  size_t itemsize() const;
  template <class T>
  T* as() { return reinterpret_cast<T*>(data.data()); }
  template <class T>
  const T* as() const { return reinterpret_cast<const T*>(data.data()); }
  // Element i converted to double (any dtype).
  double get(int64_t i) const;
};

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* dtype_name(DType d);
std::string shape_str(const std::vector<int64_t>& shape);

// Throws npy::Error with a one-line message naming the file.
Array load(const std::string& path);
void save(const std::string& path, DType dtype, const std::vector<int64_t>& shape, const void* data);

}  // namespace npy
