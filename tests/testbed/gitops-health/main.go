// gitops-health reads Kubernetes objects as JSON on stdin (one object or a List) and prints,
// for each, the health that Flux and Argo CD would show, computed by their real code:
//   - Flux: sigs.k8s.io/cli-utils kstatus (status.Compute);
//   - Argo CD: the Lua health check given as the first argument, run with gopher-lua the way
//     Argo CD runs custom health checks (global `obj`, the script returns {status, message}).
//
// Usage: kubectl get baosecrets -o json | gitops-health deploy/argocd/health.lua
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Kind           string `json:"kind"`
	Name           string `json:"name"`
	Kstatus        string `json:"kstatus"`
	KstatusMessage string `json:"kstatusMessage"`
	Argocd         string `json:"argocd"`
	ArgocdMessage  string `json:"argocdMessage"`
}

func toLua(L *lua.LState, v interface{}) lua.LValue {
	switch t := v.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(t)
	case float64:
		return lua.LNumber(t)
	case int64:
		return lua.LNumber(t)
	case string:
		return lua.LString(t)
	case []interface{}:
		tbl := L.NewTable()
		for _, e := range t {
			tbl.Append(toLua(L, e))
		}
		return tbl
	case map[string]interface{}:
		tbl := L.NewTable()
		for k, e := range t {
			tbl.RawSetString(k, toLua(L, e))
		}
		return tbl
	default:
		return lua.LString(fmt.Sprint(t))
	}
}

func argocdHealth(script string, obj map[string]interface{}) (string, string, error) {
	L := lua.NewState(lua.Options{SkipOpenLibs: false})
	defer L.Close()
	L.SetGlobal("obj", toLua(L, obj))
	if err := L.DoString(script); err != nil {
		return "", "", err
	}
	ret := L.Get(-1)
	tbl, ok := ret.(*lua.LTable)
	if !ok {
		return "", "", fmt.Errorf("health script returned %s, not a table", ret.Type())
	}
	return lua.LVAsString(tbl.RawGetString("status")), lua.LVAsString(tbl.RawGetString("message")), nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: gitops-health <argocd-health.lua> < objects.json")
		os.Exit(2)
	}
	script, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	// apimachinery's decoder keeps integers as int64, as the API machinery (and kstatus) expects.
	var in map[string]interface{}
	if err := utiljson.Unmarshal(data, &in); err != nil {
		fmt.Fprintln(os.Stderr, "stdin is not a JSON object:", err)
		os.Exit(2)
	}
	items := []interface{}{in}
	if kind, _ := in["kind"].(string); strings.HasSuffix(kind, "List") {
		items, _ = in["items"].([]interface{})
	}
	out := []result{}
	for _, it := range items {
		obj, ok := it.(map[string]interface{})
		if !ok {
			continue
		}
		u := &unstructured.Unstructured{Object: obj}
		r := result{Kind: u.GetKind(), Name: u.GetName()}
		ks, err := status.Compute(u)
		if err != nil {
			r.Kstatus, r.KstatusMessage = "Error", err.Error()
		} else {
			r.Kstatus, r.KstatusMessage = ks.Status.String(), ks.Message
		}
		r.Argocd, r.ArgocdMessage, err = argocdHealth(string(script), obj)
		if err != nil {
			r.Argocd, r.ArgocdMessage = "Error", err.Error()
		}
		out = append(out, r)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	_ = enc.Encode(out)
}
