// Package mlog stands in for monis.app/mlog, which the Go module proxy refuses: the six names
// the Secrets Store CSI driver v1.6.1 uses, on top of klog (which the driver configures itself).
package mlog

import (
	"context"

	"k8s.io/klog/v2"
)

// LogFormat is the log output format.
type LogFormat string

// The formats the driver chooses between; klog's text format is used for both.
const (
	FormatText LogFormat = "text"
	FormatJSON LogFormat = "json"
)

// Setup returns the function that flushes the logs at exit.
func Setup() func() { return klog.Flush }

// ValidateAndSetKlogLevelAndFormatGlobally accepts klog's level as set by its flags.
func ValidateAndSetKlogLevelAndFormatGlobally(_ context.Context, _ klog.Level, _ LogFormat) error {
	return nil
}

// Error logs err with msg and key/value pairs.
func Error(msg string, err error, keysAndValues ...any) {
	klog.ErrorS(err, msg, keysAndValues...)
}

// Fatal logs err and exits with status 1.
func Fatal(err error, keysAndValues ...any) {
	klog.ErrorS(err, "fatal error", keysAndValues...)
	klog.FlushAndExit(klog.ExitFlushTimeout, 1)
}
