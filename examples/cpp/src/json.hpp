// A minimal JSON reader: enough for an ssic manifest.json (objects, arrays, strings, numbers,
// true/false/null). Not a general-purpose library: no writer, numbers are doubles.
#pragma once

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace ssic_json {

class Value {
 public:
  enum class Kind { Null, Bool, Number, String, Array, Object };

  Kind kind = Kind::Null;
  bool boolean = false;
  double number = 0.0;
  std::string string;
  std::vector<Value> array;
  std::map<std::string, Value> object;

  bool is_null() const { return kind == Kind::Null; }
  bool is_object() const { return kind == Kind::Object; }
  bool is_array() const { return kind == Kind::Array; }
  bool is_string() const { return kind == Kind::String; }
  bool is_number() const { return kind == Kind::Number; }
  bool has(const std::string& key) const { return kind == Kind::Object && object.count(key) > 0; }

  // Typed accessors; throw std::runtime_error naming `what` on a type mismatch or missing key.
  const Value& at(const std::string& key) const;
  const std::string& str() const;
  double num() const;
  long long integer() const;
  const std::vector<Value>& arr() const;
};

struct ParseError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Parse a whole document; throws ParseError ("line L column C: ...").
Value parse(const std::string& text);

}  // namespace ssic_json
