// Command render renders a Helm chart the way `helm template` does, without helm.
//
// It implements the parts of Helm 3's engine a self-contained chart needs: Chart.yaml,
// values.yaml coalesced with -f files and --set / --set-string, .Values .Release .Chart
// .Capabilities .Files .Template, Go text/template with sprig's functions (minus env and
// expandenv) plus Helm's include, tpl, required, toYaml, fromYaml, fromYamlArray, toJson,
// fromJson, fromJsonArray, toToml and lookup (always empty), missingkey=zero and the
// "<no value>" clean-up, .helmignore, NOTES.txt, and the manifest post-processing of
// `helm template`: documents split on "---", empty ones dropped, each parsed as YAML,
// ordered by Helm's install order and printed with a "# Source:" comment. Anything it
// does not implement (subcharts, values.schema.json, library charts) is an error, never
// silently skipped. deploy/README.md lists the differences.
//
// Build (Debian 12 packages only, no network):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o render ./deploy/helm/render
//
// Usage:
//
//	render [--name NAME] [--namespace NS] [-f values.yaml ...] [--set k=v ...]
//	       [--set-string k=v ...] [--kube-version v1.31.0] [--api-versions G/V ...]
//	       [--strict] [--notes] [--debug] CHART_DIR
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/template"

	"github.com/BurntSushi/toml"
	"github.com/Masterminds/semver"
	"github.com/Masterminds/sprig"
	"sigs.k8s.io/yaml"
)

// ---------------------------------------------------------------------------------------
// Chart loading

// Metadata mirrors helm.sh/helm/v3/pkg/chart.Metadata: templates see it as .Chart, with
// Go field names (.Chart.Name, .Chart.AppVersion, ...).
type Metadata struct {
	Name         string            `json:"name,omitempty"`
	Home         string            `json:"home,omitempty"`
	Sources      []string          `json:"sources,omitempty"`
	Version      string            `json:"version,omitempty"`
	Description  string            `json:"description,omitempty"`
	Keywords     []string          `json:"keywords,omitempty"`
	Maintainers  []*Maintainer     `json:"maintainers,omitempty"`
	Icon         string            `json:"icon,omitempty"`
	APIVersion   string            `json:"apiVersion,omitempty"`
	Condition    string            `json:"condition,omitempty"`
	Tags         string            `json:"tags,omitempty"`
	AppVersion   string            `json:"appVersion,omitempty"`
	Deprecated   bool              `json:"deprecated,omitempty"`
	Annotations  map[string]string `json:"annotations,omitempty"`
	KubeVersion  string            `json:"kubeVersion,omitempty"`
	Dependencies []interface{}     `json:"dependencies,omitempty"`
	Type         string            `json:"type,omitempty"`
}

// Maintainer mirrors chart.Maintainer.
type Maintainer struct {
	Name  string `json:"name,omitempty"`
	Email string `json:"email,omitempty"`
	URL   string `json:"url,omitempty"`
}

type chartDir struct {
	meta      *Metadata
	values    map[string]interface{}
	templates map[string][]byte // path relative to the chart, e.g. "templates/x.yaml"
	files     Files             // everything else, as Helm's .Files
}

func loadChart(dir string) (*chartDir, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "Chart.yaml"))
	if err != nil {
		return nil, fmt.Errorf("not a chart: %v", err)
	}
	meta := &Metadata{}
	if err := yaml.Unmarshal(raw, meta); err != nil {
		return nil, fmt.Errorf("Chart.yaml: %v", err)
	}
	if meta.APIVersion != "v2" && meta.APIVersion != "v1" {
		return nil, fmt.Errorf("Chart.yaml: apiVersion must be v2 (or v1), got %q", meta.APIVersion)
	}
	if meta.Name == "" {
		return nil, errors.New("Chart.yaml: name is required")
	}
	if meta.Version == "" {
		return nil, errors.New("Chart.yaml: version is required")
	}
	if _, err := semver.NewVersion(meta.Version); err != nil {
		return nil, fmt.Errorf("Chart.yaml: version %q is not a SemVer 2 version", meta.Version)
	}
	if meta.Type == "library" {
		return nil, errors.New("Chart.yaml: library charts are not installable")
	}
	if meta.Type != "" && meta.Type != "application" {
		return nil, fmt.Errorf("Chart.yaml: type %q is neither application nor library", meta.Type)
	}
	if len(meta.Dependencies) > 0 {
		return nil, errors.New("Chart.yaml: dependencies (subcharts) are not supported by this renderer")
	}

	rules := defaultIgnoreRules()
	if data, err := os.ReadFile(filepath.Join(dir, ".helmignore")); err == nil {
		if rules, err = parseIgnoreRules(data); err != nil {
			return nil, fmt.Errorf(".helmignore: %v", err)
		}
	} else if !os.IsNotExist(err) {
		return nil, err
	}

	c := &chartDir{meta: meta, values: map[string]interface{}{}, templates: map[string][]byte{},
		files: Files{}}
	err = walkFollowingLinks(dir, "", map[string]bool{}, rules, func(rel string, data []byte) error {
		switch {
		case rel == "Chart.yaml":
		case rel == "values.yaml":
			v, err := readValues(data)
			if err != nil {
				return fmt.Errorf("values.yaml: %v", err)
			}
			c.values = v
		case rel == "values.schema.json":
			return errors.New("values.schema.json is not supported by this renderer (it would go unchecked)")
		case rel == "requirements.yaml" || strings.HasPrefix(rel, "charts/"):
			return fmt.Errorf("%s: subcharts are not supported by this renderer", rel)
		case strings.HasPrefix(rel, "templates/"):
			c.templates[rel] = data
		default:
			c.files[rel] = data
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(c.templates) == 0 {
		return nil, errors.New("chart has no templates/")
	}
	return c, nil
}

// walkFollowingLinks visits every regular file under root/rel. Like Helm's loader
// (internal/sympath), it follows symbolic links to files and folders.
func walkFollowingLinks(root, rel string, seen map[string]bool, rules *ignoreRules,
	visit func(rel string, data []byte) error) error {
	full := filepath.Join(root, filepath.FromSlash(rel))
	real, err := filepath.EvalSymlinks(full)
	if err != nil {
		return fmt.Errorf("%s: %v", rel, err)
	}
	if seen[real] {
		return fmt.Errorf("%s: symbolic link loop", rel)
	}
	seen[real] = true
	defer delete(seen, real)
	entries, err := os.ReadDir(real)
	if err != nil {
		return err
	}
	for _, e := range entries { // sorted by name
		r := path.Join(rel, e.Name())
		fi, err := os.Stat(filepath.Join(real, e.Name())) // follows links
		if err != nil {
			return fmt.Errorf("%s: %v", r, err)
		}
		if rules.ignore(r, fi.IsDir()) {
			continue
		}
		if fi.IsDir() {
			if err := walkFollowingLinks(root, r, seen, rules, visit); err != nil {
				return err
			}
			continue
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("cannot load irregular file %s", r)
		}
		data, err := os.ReadFile(filepath.Join(real, e.Name()))
		if err != nil {
			return err
		}
		if err := visit(r, data); err != nil {
			return err
		}
	}
	return nil
}

// ---------------------------------------------------------------------------------------
// .helmignore (helm.sh/helm/v3/pkg/ignore): one pattern a line, '#' comments, '!' negates,
// a trailing '/' matches folders only, a leading '/' anchors at the chart root, a pattern
// without '/' matches the base name, "**" is refused.

type ignorePattern struct {
	raw     string
	rule    string
	negate  bool
	mustDir bool
	kind    int // 0: base name, 1: path, 2: anchored path
}

type ignoreRules struct{ patterns []ignorePattern }

func defaultIgnoreRules() *ignoreRules {
	r := &ignoreRules{}
	_ = r.add("templates/.?*") // Helm's AddDefaults: hidden files in templates/
	return r
}

func parseIgnoreRules(data []byte) (*ignoreRules, error) {
	r := defaultIgnoreRules()
	for _, line := range strings.Split(string(data), "\n") {
		if err := r.add(line); err != nil {
			return nil, err
		}
	}
	return r, nil
}

func (r *ignoreRules) add(rule string) error {
	rule = strings.TrimSpace(rule)
	if rule == "" || strings.HasPrefix(rule, "#") {
		return nil
	}
	if strings.Contains(rule, "**") {
		return errors.New("double-star (**) syntax is not supported")
	}
	if _, err := filepath.Match(rule, "abc"); err != nil {
		return fmt.Errorf("%q: %v", rule, err)
	}
	p := ignorePattern{raw: rule}
	if strings.HasPrefix(rule, "!") {
		p.negate = true
		rule = rule[1:]
	}
	if strings.HasSuffix(rule, "/") {
		p.mustDir = true
		rule = strings.TrimSuffix(rule, "/")
	}
	switch {
	case strings.HasPrefix(rule, "/"):
		p.kind, rule = 2, strings.TrimPrefix(rule, "/")
	case strings.Contains(rule, "/"):
		p.kind = 1
	}
	p.rule = rule
	r.patterns = append(r.patterns, p)
	return nil
}

func (r *ignoreRules) ignore(rel string, isDir bool) bool {
	if rel == "" || rel == "." {
		return false
	}
	for _, p := range r.patterns {
		name := rel
		if p.kind == 0 {
			name = path.Base(rel)
		}
		ok, _ := filepath.Match(p.rule, name)
		if p.negate {
			if p.mustDir && !isDir {
				return true
			}
			if !ok {
				return true
			}
			continue
		}
		if p.mustDir && !isDir {
			continue
		}
		if ok {
			return true
		}
	}
	return false
}

// ---------------------------------------------------------------------------------------
// Values

// readValues parses YAML the way Helm does (sigs.k8s.io/yaml: YAML -> JSON -> Go), so
// numbers become float64 exactly as in Helm.
func readValues(data []byte) (map[string]interface{}, error) {
	v := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &v); err != nil {
		return nil, err
	}
	if v == nil {
		v = map[string]interface{}{}
	}
	return v, nil
}

// mergeMaps is Helm's CLI merge of -f files and --set: b wins, maps merge deeply.
func mergeMaps(a, b map[string]interface{}) map[string]interface{} {
	out := make(map[string]interface{}, len(a))
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		if vm, ok := v.(map[string]interface{}); ok {
			if bv, ok := out[k]; ok {
				if bm, ok := bv.(map[string]interface{}); ok {
					out[k] = mergeMaps(bm, vm)
					continue
				}
			}
		}
		out[k] = v
	}
	return out
}

func deepCopy(v interface{}) interface{} {
	switch t := v.(type) {
	case map[string]interface{}:
		m := make(map[string]interface{}, len(t))
		for k, x := range t {
			m[k] = deepCopy(x)
		}
		return m
	case []interface{}:
		l := make([]interface{}, len(t))
		for i, x := range t {
			l[i] = deepCopy(x)
		}
		return l
	default:
		return v
	}
}

// coalesce is Helm's chartutil.CoalesceValues for a chart without dependencies: user
// values win over the chart's defaults, tables merge, and a user null deletes a default.
func coalesce(defaults, user map[string]interface{}) map[string]interface{} {
	dst := deepCopy(user).(map[string]interface{})
	coalesceTables(dst, deepCopy(defaults).(map[string]interface{}), "")
	return dst
}

func coalesceTables(dst, src map[string]interface{}, prefix string) {
	for key, val := range src {
		full := strings.TrimPrefix(prefix+"."+key, ".")
		dv, ok := dst[key]
		switch {
		case ok && dv == nil:
			delete(dst, key)
		case !ok:
			dst[key] = val
		default:
			sm, srcTable := val.(map[string]interface{})
			dm, dstTable := dv.(map[string]interface{})
			if srcTable && dstTable {
				coalesceTables(dm, sm, full)
			} else if srcTable {
				warnf("cannot overwrite table with non table for %s (%v)", full, val)
			} else if dstTable && val != nil {
				warnf("destination for %s is a table. Ignoring non-table value (%v)", full, val)
			}
		}
	}
}

// setValue parses one --set / --set-string argument: comma-separated key=value pairs,
// keys with '.' for nesting and [N] for list items, values {a,b} for lists, '\' escapes.
// Typed like Helm's strvals: true/false, null, integers (not starting with 0) -> int64.
func setValue(dst map[string]interface{}, arg string, asString bool) error {
	for _, assignment := range splitUnescaped(arg, ',', true) {
		eq := indexUnescaped(assignment, '=')
		if eq < 0 {
			return fmt.Errorf("--set %q: key %q has no value", arg, assignment)
		}
		key, raw := assignment[:eq], assignment[eq+1:]
		var value interface{}
		if !asString && strings.HasPrefix(raw, "{") && strings.HasSuffix(raw, "}") {
			items := []interface{}{}
			if inner := raw[1 : len(raw)-1]; inner != "" {
				for _, s := range splitUnescaped(inner, ',', false) {
					items = append(items, typedValue(unescape(s), false))
				}
			}
			value = items
		} else {
			value = typedValue(unescape(raw), asString)
		}
		if err := setPath(dst, splitUnescaped(key, '.', false), value); err != nil {
			return fmt.Errorf("--set %q: %v", arg, err)
		}
	}
	return nil
}

func typedValue(s string, asString bool) interface{} {
	if asString {
		return s
	}
	switch {
	case strings.EqualFold(s, "true"):
		return true
	case strings.EqualFold(s, "false"):
		return false
	case strings.EqualFold(s, "null"):
		return nil
	case s == "0":
		return int64(0)
	}
	if s != "" && s[0] != '0' {
		if i, err := strconv.ParseInt(s, 10, 64); err == nil {
			return i
		}
	}
	return s
}

var indexRe = regexp.MustCompile(`^(.*?)\[(\d+)\]$`)

func setPath(m map[string]interface{}, keys []string, value interface{}) error {
	k := unescape(keys[0])
	if sm := indexRe.FindStringSubmatch(k); sm != nil {
		idx, _ := strconv.Atoi(sm[2])
		if idx > 65536 {
			return fmt.Errorf("index %d too large", idx)
		}
		list, _ := m[sm[1]].([]interface{})
		for len(list) <= idx {
			list = append(list, nil)
		}
		if len(keys) == 1 {
			list[idx] = value
		} else {
			child, ok := list[idx].(map[string]interface{})
			if !ok {
				child = map[string]interface{}{}
			}
			if err := setPath(child, keys[1:], value); err != nil {
				return err
			}
			list[idx] = child
		}
		m[sm[1]] = list
		return nil
	}
	if strings.ContainsAny(k, "[]") {
		return fmt.Errorf("unsupported key %q", k)
	}
	if len(keys) == 1 {
		m[k] = value
		return nil
	}
	child, ok := m[k].(map[string]interface{})
	if !ok {
		child = map[string]interface{}{}
		m[k] = child
	}
	return setPath(child, keys[1:], value)
}

// splitUnescaped splits s at sep when it is not escaped with '\' (and, for commas
// between assignments, not inside {...}); escapes are kept for unescape.
func splitUnescaped(s string, sep byte, braces bool) []string {
	var parts []string
	depth, start := 0, 0
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '\\':
			i++
		case braces && s[i] == '{':
			depth++
		case braces && s[i] == '}' && depth > 0:
			depth--
		case s[i] == sep && depth == 0:
			parts = append(parts, s[start:i])
			start = i + 1
		}
	}
	return append(parts, s[start:])
}

func indexUnescaped(s string, c byte) int {
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' {
			i++
		} else if s[i] == c {
			return i
		}
	}
	return -1
}

func unescape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// ---------------------------------------------------------------------------------------
// .Files, .Capabilities

// Files is Helm's .Files: the chart's non-template files by path.
type Files map[string][]byte

// Get returns a file's content ("" when missing).
func (f Files) Get(name string) string { return string(f[name]) }

// GetBytes returns a file's content as bytes.
func (f Files) GetBytes(name string) []byte { return f[name] }

// Glob returns the files whose path matches pattern ('*' does not cross '/').
func (f Files) Glob(pattern string) Files {
	out := Files{}
	for name, data := range f {
		if ok, err := path.Match(pattern, name); err == nil && ok {
			out[name] = data
		}
	}
	return out
}

// Lines splits a file into lines.
func (f Files) Lines(name string) []string {
	s := string(f[name])
	if s == "" {
		return []string{}
	}
	return strings.Split(strings.TrimSuffix(s, "\n"), "\n")
}

// AsConfig renders the files as ConfigMap data (base name: content).
func (f Files) AsConfig() string {
	if len(f) == 0 {
		return ""
	}
	m := map[string]string{}
	for k, v := range f {
		m[path.Base(k)] = string(v)
	}
	return toYAML(m)
}

// AsSecrets renders the files as Secret data (base name: base64 content).
func (f Files) AsSecrets() string {
	if len(f) == 0 {
		return ""
	}
	m := map[string]string{}
	for k, v := range f {
		m[path.Base(k)] = base64.StdEncoding.EncodeToString(v)
	}
	return toYAML(m)
}

// KubeVersion is .Capabilities.KubeVersion.
type KubeVersion struct {
	Version string
	Major   string
	Minor   string
}

// String returns the version, e.g. v1.29.0.
func (k KubeVersion) String() string { return k.Version }

// GitVersion is the same as Version (Helm keeps it for compatibility).
func (k KubeVersion) GitVersion() string { return k.Version }

// VersionSet is .Capabilities.APIVersions.
type VersionSet []string

// Has tells whether an API group/version (or group/version/Kind) is available.
func (v VersionSet) Has(apiVersion string) bool {
	for _, x := range v {
		if x == apiVersion {
			return true
		}
	}
	return false
}

// HelmVersion is .Capabilities.HelmVersion.
type HelmVersion struct {
	Version      string
	GitCommit    string
	GitTreeState string
	GoVersion    string
}

// Capabilities is .Capabilities.
type Capabilities struct {
	KubeVersion KubeVersion
	APIVersions VersionSet
	HelmVersion HelmVersion
}

// builtinAPIVersions are the group/versions a Kubernetes 1.31 API server serves by default
// (what `helm template` reports without a cluster).
var builtinAPIVersions = []string{
	"v1", "admissionregistration.k8s.io/v1", "apiextensions.k8s.io/v1",
	"apiregistration.k8s.io/v1", "apps/v1", "authentication.k8s.io/v1",
	"authorization.k8s.io/v1", "autoscaling/v1", "autoscaling/v2", "batch/v1",
	"certificates.k8s.io/v1", "coordination.k8s.io/v1", "discovery.k8s.io/v1",
	"events.k8s.io/v1", "flowcontrol.apiserver.k8s.io/v1", "flowcontrol.apiserver.k8s.io/v1beta3",
	"networking.k8s.io/v1",
	"node.k8s.io/v1", "policy/v1", "rbac.authorization.k8s.io/v1", "scheduling.k8s.io/v1",
	"storage.k8s.io/v1",
}

// ---------------------------------------------------------------------------------------
// Template functions (helm.sh/helm/v3/pkg/engine/funcs.go)

func toYAML(v interface{}) string {
	data, err := yaml.Marshal(v)
	if err != nil {
		return "" // Helm swallows errors here
	}
	return strings.TrimSuffix(string(data), "\n")
}

func fromYAML(s string) map[string]interface{} {
	m := map[string]interface{}{}
	if err := yaml.Unmarshal([]byte(s), &m); err != nil {
		m["Error"] = err.Error()
	}
	return m
}

func fromYAMLArray(s string) []interface{} {
	a := []interface{}{}
	if err := yaml.Unmarshal([]byte(s), &a); err != nil {
		a = []interface{}{err.Error()}
	}
	return a
}

func toJSON(v interface{}) string {
	data, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	return string(data)
}

func fromJSON(s string) map[string]interface{} {
	m := map[string]interface{}{}
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		m["Error"] = err.Error()
	}
	return m
}

func fromJSONArray(s string) []interface{} {
	a := []interface{}{}
	if err := json.Unmarshal([]byte(s), &a); err != nil {
		a = []interface{}{err.Error()}
	}
	return a
}

func toTOML(v interface{}) string {
	var b bytes.Buffer
	if err := toml.NewEncoder(&b).Encode(v); err != nil {
		return err.Error()
	}
	return b.String()
}

func required(msg string, v interface{}) (interface{}, error) {
	if v == nil {
		return v, errors.New(msg)
	}
	if s, ok := v.(string); ok && s == "" {
		return v, errors.New(msg)
	}
	return v, nil
}

const maxIncludeDepth = 1000

type engine struct {
	strict   bool
	included map[string]int
}

func (e *engine) missingKeyOption() string {
	if e.strict {
		return "missingkey=error"
	}
	return "missingkey=zero"
}

func (e *engine) funcMap() template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env")
	delete(f, "expandenv")
	extra := template.FuncMap{
		"toToml":        toTOML,
		"toYaml":        toYAML,
		"fromYaml":      fromYAML,
		"fromYamlArray": fromYAMLArray,
		"toJson":        toJSON,
		"fromJson":      fromJSON,
		"fromJsonArray": fromJSONArray,
		"required":      required,
		// Without a cluster, lookup finds nothing (as in `helm template`).
		"lookup": func(string, string, string, string) (map[string]interface{}, error) {
			return map[string]interface{}{}, nil
		},
		// Bound to the template set in bind().
		"include": func(string, interface{}) (string, error) { return "", nil },
		"tpl":     func(string, interface{}) (string, error) { return "", nil },
	}
	for k, v := range extra {
		f[k] = v
	}
	return f
}

// bind late-binds include and tpl to t, as Helm's engine does.
func (e *engine) bind(t *template.Template) {
	t.Funcs(template.FuncMap{"include": e.includeFunc(t), "tpl": e.tplFunc(t)})
}

func (e *engine) includeFunc(t *template.Template) func(string, interface{}) (string, error) {
	return func(name string, data interface{}) (string, error) {
		if e.included[name] > maxIncludeDepth {
			return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
		}
		e.included[name]++
		defer func() { e.included[name]-- }()
		var b strings.Builder
		if err := t.ExecuteTemplate(&b, name, data); err != nil {
			return "", err
		}
		return b.String(), nil
	}
}

func (e *engine) tplFunc(parent *template.Template) func(string, interface{}) (string, error) {
	return func(text string, vals interface{}) (string, error) {
		t, err := parent.Clone()
		if err != nil {
			return "", fmt.Errorf("cannot clone template: %v", err)
		}
		t.Option(e.missingKeyOption())
		e.bind(t)
		name := "tpl"
		if m, ok := vals.(map[string]interface{}); ok {
			if tm, ok := m["Template"].(map[string]interface{}); ok {
				if n, ok := tm["Name"].(string); ok && n != "" {
					name = n
				}
			}
		}
		t, err = t.New(name).Parse(text)
		if err != nil {
			return "", fmt.Errorf("cannot parse template %q: %v", text, err)
		}
		var b strings.Builder
		if err := t.Execute(&b, vals); err != nil {
			return "", fmt.Errorf("error during tpl function execution for %q: %v", text, err)
		}
		return strings.ReplaceAll(b.String(), "<no value>", ""), nil
	}
}

// byPathLen is Helm's template order: deeper paths first, then by name.
func sortTemplateNames(names []string) {
	sort.Slice(names, func(i, j int) bool {
		ci, cj := strings.Count(names[i], "/"), strings.Count(names[j], "/")
		if ci != cj {
			return ci > cj
		}
		return names[i] > names[j]
	})
}

// renderTemplates executes every template (partials only through include) and returns
// name -> output.
func renderTemplates(c *chartDir, top map[string]interface{}, strict, debug bool) (map[string]string, error) {
	e := &engine{strict: strict, included: map[string]int{}}
	t := template.New("gotpl")
	t.Option(e.missingKeyOption())
	t.Funcs(e.funcMap())
	e.bind(t)
	prefix := c.meta.Name + "/"
	var names []string
	for rel := range c.templates {
		names = append(names, prefix+rel)
	}
	sortTemplateNames(names)
	for _, name := range names {
		if _, err := t.New(name).Parse(string(c.templates[strings.TrimPrefix(name, prefix)])); err != nil {
			return nil, fmt.Errorf("parse error: %v", err)
		}
	}
	out := map[string]string{}
	for _, name := range names {
		if strings.HasPrefix(path.Base(name), "_") {
			continue
		}
		vals := map[string]interface{}{}
		for k, v := range top {
			vals[k] = v
		}
		vals["Template"] = map[string]interface{}{"Name": name, "BasePath": prefix + "templates"}
		var b strings.Builder
		if err := t.ExecuteTemplate(&b, name, vals); err != nil {
			return nil, cleanupExecError(name, err, debug)
		}
		out[name] = strings.ReplaceAll(b.String(), "<no value>", "")
	}
	return out, nil
}

var (
	execLocation = regexp.MustCompile(`template: ([^:]+:\d+(?::\d+)?): `)
	execChain    = regexp.MustCompile(`^(?:template: [^:]+:\d+(?::\d+)?: |executing ".*?" at <.*?>: |error calling \w+: )`)
)

// cleanupExecError shortens text/template's chain of nested calls to the innermost
// message and location, as Helm does ("execution error at (file:line:col): message");
// debug keeps the whole chain.
func cleanupExecError(name string, err error, debug bool) error {
	text := err.Error()
	if debug {
		return fmt.Errorf("execution error in %s: %s", name, text)
	}
	locations := execLocation.FindAllStringSubmatch(text, -1)
	msg := text
	for {
		loc := execChain.FindStringIndex(msg)
		if loc == nil {
			break
		}
		msg = msg[loc[1]:]
	}
	if len(locations) == 0 {
		return fmt.Errorf("execution error in %s: %s", name, msg)
	}
	where := locations[len(locations)-1][1]
	if outer := locations[0][1]; outer != where {
		where += ", from " + outer
	}
	return fmt.Errorf("execution error at (%s): %s", where, msg)
}

// ---------------------------------------------------------------------------------------
// Manifests (helm.sh/helm/v3/pkg/releaseutil)

var docSep = regexp.MustCompile(`(?:^|\s*\n)---\s*`)

type manifest struct {
	source  string
	content string
	kind    string
	hook    bool
}

// installOrder is Helm's releaseutil.InstallOrder; unknown kinds go last, by kind name.
var installOrder = []string{
	"PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
	"PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
	"ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
	"CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
	"ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
	"DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
	"HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
	"APIService",
}

func splitManifests(rendered map[string]string) ([]manifest, error) {
	var sources []string
	for s := range rendered {
		sources = append(sources, s)
	}
	sort.Strings(sources)
	var out []manifest
	for _, src := range sources {
		content := rendered[src]
		if strings.TrimSpace(content) == "" {
			continue
		}
		for _, doc := range docSep.Split(strings.TrimSpace(content), -1) {
			doc = strings.TrimSpace(doc)
			if doc == "" {
				continue
			}
			var head struct {
				Version  string `json:"apiVersion"`
				Kind     string `json:"kind"`
				Metadata *struct {
					Name        string            `json:"name"`
					Annotations map[string]string `json:"annotations"`
				} `json:"metadata"`
			}
			if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
				return nil, fmt.Errorf("YAML parse error on %s: %v\n--- document ---\n%s", src, err,
					numbered(doc))
			}
			m := manifest{source: src, content: doc, kind: head.Kind}
			if head.Metadata != nil {
				_, m.hook = head.Metadata.Annotations["helm.sh/hook"]
			}
			out = append(out, m)
		}
	}
	rank := map[string]int{}
	for i, k := range installOrder {
		rank[k] = i
	}
	sort.SliceStable(out, func(i, j int) bool {
		ri, iok := rank[out[i].kind]
		rj, jok := rank[out[j].kind]
		switch {
		case !iok && !jok:
			return out[i].kind < out[j].kind
		case !iok:
			return false
		case !jok:
			return true
		}
		return ri < rj
	})
	return out, nil
}

func numbered(doc string) string {
	var b strings.Builder
	for i, line := range strings.Split(doc, "\n") {
		fmt.Fprintf(&b, "%4d | %s\n", i+1, line)
	}
	return b.String()
}

// ---------------------------------------------------------------------------------------
// Command line

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func warnf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "render: warning: "+format+"\n", args...)
}

func run(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("render", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var valueFiles, sets, setStrings, apiVersions multiFlag
	fs.Var(&valueFiles, "f", "values file (repeatable; later ones win)")
	fs.Var(&valueFiles, "values", "same as -f")
	fs.Var(&sets, "set", "key=value[,key=value] (repeatable)")
	fs.Var(&setStrings, "set-string", "key=value, always a string (repeatable)")
	fs.Var(&apiVersions, "api-versions", "extra .Capabilities.APIVersions entry (repeatable)")
	fs.Var(&apiVersions, "a", "same as --api-versions")
	name := fs.String("name", "release-name", "release name (.Release.Name)")
	namespace := fs.String("namespace", "default", "release namespace (.Release.Namespace)")
	fs.StringVar(namespace, "n", "default", "same as --namespace")
	kubeVersion := fs.String("kube-version", "v1.31.0", ".Capabilities.KubeVersion")
	strict := fs.Bool("strict", false, "missingkey=error instead of missingkey=zero")
	notes := fs.Bool("notes", false, "also print the rendered NOTES.txt to stderr")
	debug := fs.Bool("debug", false, "execution errors with their whole chain of calls")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: render [flags] CHART_DIR")
		fs.PrintDefaults()
	}
	// Flags may come before or after the chart folder.
	var positional []string
	for rest := args; ; {
		if err := fs.Parse(rest); err != nil {
			return err
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		rest = fs.Args()[1:]
	}
	if len(positional) != 1 {
		fs.Usage()
		return errors.New("exactly one CHART_DIR is required")
	}

	c, err := loadChart(positional[0])
	if err != nil {
		return err
	}
	kv, err := semver.NewVersion(*kubeVersion)
	if err != nil {
		return fmt.Errorf("--kube-version %q: %v", *kubeVersion, err)
	}
	if c.meta.KubeVersion != "" {
		constraint, err := semver.NewConstraint(c.meta.KubeVersion)
		if err != nil {
			return fmt.Errorf("Chart.yaml kubeVersion %q: %v", c.meta.KubeVersion, err)
		}
		// Helm compares the version without its pre-release part.
		plain, _ := semver.NewVersion(fmt.Sprintf("%d.%d.%d", kv.Major(), kv.Minor(), kv.Patch()))
		if !constraint.Check(plain) {
			return fmt.Errorf("chart requires kubeVersion: %s which is incompatible with Kubernetes %s",
				c.meta.KubeVersion, *kubeVersion)
		}
	}

	user := map[string]interface{}{}
	for _, f := range valueFiles {
		data, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		v, err := readValues(data)
		if err != nil {
			return fmt.Errorf("%s: %v", f, err)
		}
		user = mergeMaps(user, v)
	}
	for _, s := range sets {
		if err := setValue(user, s, false); err != nil {
			return err
		}
	}
	for _, s := range setStrings {
		if err := setValue(user, s, true); err != nil {
			return err
		}
	}
	values := coalesce(c.values, user)

	caps := Capabilities{
		KubeVersion: KubeVersion{Version: "v" + kv.String(), Major: strconv.FormatUint(kv.Major(), 10),
			Minor: strconv.FormatUint(kv.Minor(), 10)},
		APIVersions: append(append(VersionSet{}, builtinAPIVersions...), apiVersions...),
		HelmVersion: HelmVersion{Version: "v3.14.0+kvrelay-render"},
	}
	top := map[string]interface{}{
		"Values": values,
		"Release": map[string]interface{}{
			"Name": *name, "Namespace": *namespace, "IsUpgrade": false, "IsInstall": true,
			"Revision": 1, "Service": "Helm",
		},
		"Chart":        c.meta,
		"Capabilities": caps,
		"Files":        c.files,
	}
	rendered, err := renderTemplates(c, top, *strict, *debug)
	if err != nil {
		return err
	}
	for src, out := range rendered {
		if strings.HasSuffix(src, "/NOTES.txt") {
			if *notes {
				fmt.Fprintln(stderr, out)
			}
			delete(rendered, src)
		}
	}
	manifests, err := splitManifests(rendered)
	if err != nil {
		return err
	}
	var b strings.Builder
	for _, hooks := range []bool{false, true} { // `helm template` prints hooks last
		for _, m := range manifests {
			if m.hook == hooks {
				fmt.Fprintf(&b, "---\n# Source: %s\n%s\n", m.source, m.content)
			}
		}
	}
	_, err = io.WriteString(stdout, b.String())
	return err
}

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(os.Stderr, "render: error: %v\n", err)
		}
		os.Exit(1)
	}
}
