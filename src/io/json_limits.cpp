#include "multipole/io/json_limits.hpp"

#include "multipole/core/error.hpp"

namespace multipole {

void check_json_depth(std::string_view text, std::string_view what, int max_depth) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;  // the escaped character cannot end the string
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      MP_CHECK(++depth <= max_depth, "{}: JSON nested deeper than {} levels (at byte {})", what, max_depth, i);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}

}  // namespace multipole
