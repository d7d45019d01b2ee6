#include "npy.hpp"

#include <cstring>
#include <fstream>
#include <sstream>

namespace npy {

namespace {

struct DTypeInfo {
  DType dtype;
  const char* descr;
  size_t size;
};

const DTypeInfo kTypes[] = {
    {DType::Float32, "<f4", 4}, {DType::Float64, "<f8", 8}, {DType::Int64, "<i8", 8},
    {DType::Int32, "<i4", 4},   {DType::Bool, "|b1", 1},    {DType::UInt8, "|u1", 1},
};

const DTypeInfo& info(DType d) {
  for (const auto& t : kTypes)
    if (t.dtype == d) return t;
  throw Error("unknown dtype");
}

bool little_endian_host() {
  uint16_t x = 1;
  uint8_t b;
  std::memcpy(&b, &x, 1);
  return b == 1;
}

// Value of `key` in the header dict: the text after "'key':" up to the matching end.
std::string field(const std::string& header, const std::string& key, const std::string& path) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) throw Error(path + ": not a valid .npy file (no '" + key + "' in the header)");
  size_t colon = header.find(':', k);
  if (colon == std::string::npos) throw Error(path + ": not a valid .npy file (bad header)");
  size_t i = colon + 1;
  while (i < header.size() && header[i] == ' ') ++i;
  size_t end = i;
  if (i < header.size() && header[i] == '(') {
    end = header.find(')', i);
    if (end == std::string::npos) throw Error(path + ": not a valid .npy file (bad shape)");
    ++end;
  } else if (i < header.size() && (header[i] == '\'' || header[i] == '"')) {
    end = header.find(header[i], i + 1);
    if (end == std::string::npos) throw Error(path + ": not a valid .npy file (bad header)");
    ++end;
  } else {
    while (end < header.size() && header[end] != ',' && header[end] != '}') ++end;
  }
  return header.substr(i, end - i);
}

}  // namespace

const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Int64: return "int64";
    case DType::Int32: return "int32";
    case DType::Bool: return "bool";
    case DType::UInt8: return "uint8";
  }
  return "?";
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t Array::size() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t Array::itemsize() const { return info(dtype).size; }

double Array::get(int64_t i) const {
  switch (dtype) {
    case DType::Float32: return as<float>()[i];
    case DType::Float64: return as<double>()[i];
    case DType::Int64: return static_cast<double>(as<int64_t>()[i]);
    case DType::Int32: return as<int32_t>()[i];
    case DType::Bool: return data[static_cast<size_t>(i)] ? 1.0 : 0.0;
    case DType::UInt8: return data[static_cast<size_t>(i)];
  }
  return 0.0;
}

Array load(const std::string& path) {
  if (!little_endian_host()) throw Error("big-endian hosts are not supported");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot open (no such file or not readable)");
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    throw Error(path + ": not a .npy file (bad magic; save arrays with numpy.save)");
  uint8_t major = static_cast<uint8_t>(magic[6]);
  size_t header_len = 0;
  if (major == 1) {
    uint8_t b[2];
    if (!f.read(reinterpret_cast<char*>(b), 2)) throw Error(path + ": truncated .npy header");
    header_len = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    uint8_t b[4];
    if (!f.read(reinterpret_cast<char*>(b), 4)) throw Error(path + ": truncated .npy header");
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<size_t>(b[3]) << 24);
  } else {
    throw Error(path + ": unsupported .npy format version " + std::to_string(major));
  }
  if (header_len > (1u << 20)) throw Error(path + ": .npy header too large");
  std::string header(header_len, '\0');
  if (!f.read(&header[0], static_cast<std::streamsize>(header_len))) throw Error(path + ": truncated .npy header");

  std::string descr = field(header, "descr", path);
  descr = descr.size() >= 2 ? descr.substr(1, descr.size() - 2) : descr;
  if (descr == "<b1" || descr == "=b1") descr = "|b1";
  if (descr == "<u1" || descr == "=u1") descr = "|u1";
  Array a;
  bool known = false;
  for (const auto& t : kTypes) {
    if (descr == t.descr) {
      a.dtype = t.dtype;
      known = true;
    }
  }
  if (!known)
    throw Error(path + ": unsupported dtype '" + descr + "' (use float32, float64, int64, int32, bool or uint8)");
  if (field(header, "fortran_order", path).find("True") != std::string::npos)
    throw Error(path + ": Fortran-order arrays are not supported (save a C-contiguous array)");
  std::string shape = field(header, "shape", path);
  std::string num;
  for (char c : shape) {
    if (c >= '0' && c <= '9') {
      num += c;
    } else if (!num.empty()) {
      a.shape.push_back(std::stoll(num));
      num.clear();
    }
  }
  if (!num.empty()) a.shape.push_back(std::stoll(num));

  size_t bytes = static_cast<size_t>(a.size()) * a.itemsize();
  a.data.resize(bytes);
  if (bytes && !f.read(reinterpret_cast<char*>(a.data.data()), static_cast<std::streamsize>(bytes)))
    throw Error(path + ": truncated .npy data (expected " + std::to_string(bytes) + " bytes for shape " +
                shape_str(a.shape) + ")");
  return a;
}

void save(const std::string& path, DType dtype, const std::vector<int64_t>& shape, const void* data) {
  if (!little_endian_host()) throw Error("big-endian hosts are not supported");
  std::ostringstream h;
  h << "{'descr': '" << info(dtype).descr << "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < shape.size(); ++i) h << shape[i] << (shape.size() == 1 || i + 1 < shape.size() ? "," : "") << (i + 1 < shape.size() ? " " : "");
  h << "), }";
  std::string header = h.str();
  // Pad with spaces so that magic(6) + version(2) + len(2) + header + '\n' is a multiple of 64.
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  if (header.size() > 65535) throw Error(path + ": shape too long for a .npy v1.0 header");

  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw Error(path + ": cannot open for writing");
  const char magic[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  f.write(magic, 8);
  uint8_t len[2] = {static_cast<uint8_t>(header.size() & 0xFF), static_cast<uint8_t>(header.size() >> 8)};
  f.write(reinterpret_cast<const char*>(len), 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(static_cast<size_t>(n) * info(dtype).size));
  if (!f) throw Error(path + ": write failed");
}

}  // namespace npy
