// kstatus-verdict prints what kstatus (sigs.k8s.io/cli-utils, the library Flux and kpt use) decides for each object of a
// JSON list read from stdin: one line per object, "<name> <status>". flowtel's tests hold WorkflowRun and
// TelemetryStack conditions to the verdicts a GitOps tool waiting on them needs.
package main

import (
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var list struct {
		Items []map[string]interface{} `json:"items"`
	}
	// apimachinery's decoder keeps integers int64, as unstructured accessors expect.
	if err := json.Unmarshal(data, &list); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for _, item := range list.Items {
		u := &unstructured.Unstructured{Object: item}
		result, err := status.Compute(u)
		if err != nil {
			fmt.Printf("%s Error %v\n", u.GetName(), err)
			continue
		}
		fmt.Printf("%s %s\n", u.GetName(), result.Status)
	}
}
