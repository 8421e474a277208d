#include "tools/cli/args.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvrelay::cli {

Args& Args::Flag(const std::string& name, Kind kind, const std::string& help, bool repeatable) {
  order_.push_back(name);
  specs_[name] = Spec{kind, help, repeatable};
  return *this;
}

Args& Args::IntFlag(const std::string& name, long long min, long long max, const std::string& help,
                    bool repeatable) {
  Flag(name, Kind::kInt, help, repeatable);
  specs_[name].min = min;
  specs_[name].max = max;
  return *this;
}

absl::Status Args::Parse(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument '", arg, "' (flags start with --)"));
    }
    std::string name = arg.substr(2), value;
    bool has_value = false;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    auto it = specs_.find(name);
    if (it == specs_.end())
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    const Spec& spec = it->second;
    if (spec.kind == Kind::kBool) {
      if (!has_value) value = "true";
      if (value != "true" && value != "false") {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, " takes true or false, got '", value, "'"));
      }
    } else if (!has_value) {
      if (i + 1 >= argc)
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      value = argv[++i];
    }
    if (spec.kind == Kind::kInt) {
      long long v;
      if (!absl::SimpleAtoi(value, &v)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, " takes an integer, got '", value, "'"));
      }
      if (v < spec.min || v > spec.max) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, " must be in [", spec.min, ", ", spec.max, "], got ", v));
      }
    } else if (spec.kind == Kind::kFloat) {
      double v;
      if (!absl::SimpleAtod(value, &v)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, " takes a number, got '", value, "'"));
      }
    }
    auto& vals = values_[name];
    if (!spec.repeatable && !vals.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " given more than once"));
    }
    vals.push_back(value);
  }
  return absl::OkStatus();
}

bool Args::Has(const std::string& name) const { return values_.count(name) > 0; }

std::string Args::GetString(const std::string& name, const std::string& def) const {
  auto it = values_.find(name);
  return it == values_.end() ? def : it->second.back();
}

std::vector<std::string> Args::GetAll(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

long long Args::GetInt(const std::string& name, long long def) const {
  long long v = def;
  if (Has(name)) (void)absl::SimpleAtoi(GetString(name, ""), &v);
  return v;
}

double Args::GetFloat(const std::string& name, double def) const {
  double v = def;
  if (Has(name)) (void)absl::SimpleAtod(GetString(name, ""), &v);
  return v;
}

bool Args::GetBool(const std::string& name) const { return GetString(name, "false") == "true"; }

std::string Args::Help() const {
  std::string out;
  for (const std::string& n : order_) {
    const Spec& s = specs_.at(n);
    absl::StrAppend(
        &out, absl::StrFormat("  --%-22s %s%s\n", n, s.help, s.repeatable ? " (repeatable)" : ""));
  }
  return out;
}

}  // namespace kvrelay::cli
