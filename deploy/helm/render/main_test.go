package main

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestSetValueTypesAndPaths(t *testing.T) {
	got := map[string]interface{}{}
	for _, s := range []string{
		"a.b=1,a.c=true,a.d=null,a.e=007,a.f=x\\,y",
		"list[1].name=z,tags={one,2}",
		"dotted\\.key=v",
	} {
		if err := setValue(got, s, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := setValue(got, "s=123", true); err != nil {
		t.Fatal(err)
	}
	want := map[string]interface{}{
		"a":          map[string]interface{}{"b": int64(1), "c": true, "d": nil, "e": "007", "f": "x,y"},
		"list":       []interface{}{nil, map[string]interface{}{"name": "z"}},
		"tags":       []interface{}{"one", int64(2)},
		"dotted.key": "v",
		"s":          "123",
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %#v\nwant %#v", got, want)
	}
	if err := setValue(map[string]interface{}{}, "novalue", false); err == nil {
		t.Fatal("a key without '=' must fail")
	}
}

func TestCoalesceLikeHelm(t *testing.T) {
	defaults, _ := readValues([]byte("a: {p: 1, q: 2}\nb: keep\nc: {z: 3}\nd: 4\n"))
	user := mergeMaps(
		map[string]interface{}{"a": map[string]interface{}{"p": 10}},
		map[string]interface{}{"a": map[string]interface{}{"q": nil}, "c": "scalar", "d": nil, "e": 5},
	)
	got := coalesce(defaults, user)
	want := map[string]interface{}{
		"a": map[string]interface{}{"p": 10}, // q: null deleted the default
		"b": "keep",
		"c": "scalar", // a user scalar replaces a default table (Helm warns)
		"e": 5,
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %#v\nwant %#v", got, want)
	}
	// YAML 1.1, as in Helm (sigs.k8s.io/yaml on yaml.v2): an unquoted y key is true.
	if v, _ := readValues([]byte("y: 1\n")); v["true"] != float64(1) {
		t.Fatalf("got %#v", v)
	}
	if defaults["a"].(map[string]interface{})["q"] != float64(2) {
		t.Fatal("coalesce modified the chart's defaults")
	}
}

func writeChart(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, text := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func renderChart(t *testing.T, files map[string]string, args ...string) (string, error) {
	t.Helper()
	var out, errs strings.Builder
	err := run(append(args, writeChart(t, files)), &out, &errs)
	return out.String(), err
}

func TestRenderEngine(t *testing.T) {
	files := map[string]string{
		"Chart.yaml":       "apiVersion: v2\nname: demo\nversion: 1.2.3\nappVersion: \"9\"\n",
		"values.yaml":      "big: 268435456\nname: world\ntext: \"{{ .Values.name }}!\"\n",
		"files/a.conf":     "alpha\n",
		"files/b.conf":     "beta\n",
		"files/sub/c.conf": "not matched by files/*.conf\n",
		"scratch.orig":     "ignored",
		".helmignore":      "*.orig\n",
		"templates/_h.tpl": `{{- define "demo.hello" }}hello {{ . }}{{ end }}`,
		"templates/cm.yaml": `apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-{{ .Chart.Name }}
  namespace: {{ .Release.Namespace }}
data:
  big: {{ .Values.big | quote }}
  missing: "{{ .Values.nothing }}"
  hello: {{ include "demo.hello" .Values.name | quote }}
  tpl: {{ tpl .Values.text . | quote }}
  template: {{ .Template.Name }}
  kube: {{ .Capabilities.KubeVersion.Major }}.{{ .Capabilities.KubeVersion.Minor }}
  has: "{{ .Capabilities.APIVersions.Has "apps/v1" }}"
  ignored: "{{ .Files.Get "scratch.orig" }}"
  {{- (.Files.Glob "files/*.conf").AsConfig | nindent 2 }}
---
# only a comment: kept, as Helm keeps it
---
`,
		"templates/svc.yaml":  "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n",
		"templates/NOTES.txt": "{{ .Release.Name }} installed\n",
	}
	out, err := renderChart(t, files, "--name", "rel", "-n", "ns")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"---\n# Source: demo/templates/cm.yaml\napiVersion: v1\nkind: ConfigMap",
		"name: rel-demo", "namespace: ns",
		`big: "2.68435456e+08"`, // float64 values, as in Helm
		`missing: ""`,           // "<no value>" removed
		`hello: "hello world"`,
		`tpl: "world!"`,
		"template: demo/templates/cm.yaml",
		"kube: 1.31", `has: "true"`, `ignored: ""`,
		"a.conf: |\n    alpha\n  b.conf: |\n    beta",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "c.conf") || strings.Contains(out, "installed") {
		t.Errorf("glob crossed '/' or NOTES.txt was printed:\n%s", out)
	}
	// Helm's install order: ConfigMap before Service, whatever the file order.
	if strings.Index(out, "kind: ConfigMap") > strings.Index(out, "kind: Service") {
		t.Errorf("ConfigMap must come before Service (Helm's install order):\n%s", out)
	}
	if n := strings.Count(out, "---\n# Source:"); n != 3 {
		t.Errorf("%d documents, want 3 (empty one dropped, comment-only one kept):\n%s", n, out)
	}

	out, err = renderChart(t, files, "--set", "big=1,name=set", "--set-string", "text=plain")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, `big: "1"`) || !strings.Contains(out, `tpl: "plain"`) {
		t.Errorf("--set not applied:\n%s", out)
	}
}

func TestRenderFailsLoudly(t *testing.T) {
	chart := "apiVersion: v2\nname: demo\nversion: 0.1.0\n"
	for name, c := range map[string]struct {
		files map[string]string
		want  string
	}{
		"required": {map[string]string{"templates/a.yaml": `x: {{ required "x is required" .Values.x }}`},
			"x is required"},
		"fail": {map[string]string{"templates/a.yaml": `{{ fail "no way" }}`}, "no way"},
		"nil pointer": {map[string]string{"templates/a.yaml": `x: {{ .Values.a.b }}`},
			"nil pointer evaluating"},
		"parse": {map[string]string{"templates/a.yaml": `{{ if }}`}, "parse error"},
		"yaml":  {map[string]string{"templates/a.yaml": "a: [1\n"}, "YAML parse error on demo/templates/a.yaml"},
		"env removed": {map[string]string{"templates/a.yaml": `{{ env "HOME" }}`},
			`function "env" not defined`},
		"schema": {map[string]string{"templates/a.yaml": "a: 1\n", "values.schema.json": "{}"},
			"values.schema.json is not supported"},
		"subchart": {map[string]string{"templates/a.yaml": "a: 1\n", "charts/x/Chart.yaml": chart},
			"subcharts are not supported"},
		"kubeVersion": {map[string]string{"Chart.yaml": chart + "kubeVersion: '>=1.40.0-0'\n",
			"templates/a.yaml": "a: 1\n"}, "incompatible with Kubernetes"},
	} {
		t.Run(name, func(t *testing.T) {
			files := map[string]string{"Chart.yaml": chart}
			for k, v := range c.files {
				files[k] = v
			}
			_, err := renderChart(t, files)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want one containing %q", err, c.want)
			}
		})
	}
	if _, err := renderChart(t, map[string]string{"Chart.yaml": chart, "templates/a.yaml": "{{ .Values.a.b }}"},
		"--strict"); err == nil {
		t.Fatal("--strict: a missing key must fail")
	}
}
