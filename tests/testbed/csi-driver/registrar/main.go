// registrar registers a CSI driver with the kubelet, as node-driver-registrar does (which the
// Go module proxy refuses): it serves the kubelet's plugin-registration API
// (k8s.io/kubelet/pkg/apis/pluginregistration/v1) on <plugins_registry>/<driver>-reg.sock,
// telling the kubelet where the driver's CSI socket is. Exits 1 if the kubelet rejects the
// driver, 0 on SIGTERM/SIGINT (removing its socket).
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registrar struct {
	registerapi.UnimplementedRegistrationServer
	driver, endpoint string
}

func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	log.Printf("kubelet asked for the plugin info: %s at %s", r.driver, r.endpoint)
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.driver,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, status *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !status.PluginRegistered {
		log.Fatalf("the kubelet rejected %s: %s", r.driver, status.Error)
	}
	log.Printf("the kubelet registered %s", r.driver)
	return &registerapi.RegistrationStatusResponse{}, nil
}

// waitForDriver waits (up to a minute) until the driver accepts connections on its socket.
func waitForDriver(endpoint string) {
	deadline := time.Now().Add(time.Minute)
	for {
		conn, err := net.Dial("unix", endpoint)
		if err == nil {
			conn.Close()
			return
		}
		if time.Now().After(deadline) {
			log.Fatalf("the CSI driver does not serve on %s: %v", endpoint, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func main() {
	driver := flag.String("driver-name", "secrets-store.csi.k8s.io", "the CSI driver's name")
	endpoint := flag.String("csi-address", "", "absolute path of the driver's CSI socket")
	registry := flag.String("plugin-registration-dir", "/var/lib/kubelet/plugins_registry", "the kubelet's plugin registration directory")
	flag.Parse()
	if *endpoint == "" {
		log.Fatal("--csi-address is required: the path of the driver's CSI socket")
	}
	// As node-driver-registrar does: announce the driver only once it serves, or the kubelet's
	// first call to it fails and the registration with it.
	waitForDriver(*endpoint)
	socket := filepath.Join(*registry, *driver+"-reg.sock")
	if err := os.Remove(socket); err != nil && !os.IsNotExist(err) {
		log.Fatalf("remove the old socket %s: %v", socket, err)
	}
	listener, err := net.Listen("unix", socket)
	if err != nil {
		log.Fatalf("listen on %s: %v", socket, err)
	}
	server := grpc.NewServer()
	registerapi.RegisterRegistrationServer(server, &registrar{driver: *driver, endpoint: *endpoint})
	go func() {
		signals := make(chan os.Signal, 1)
		signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
		<-signals
		server.Stop()
	}()
	log.Printf("serving the plugin-registration API for %s on %s", *driver, socket)
	if err := server.Serve(listener); err != nil {
		log.Fatalf("serve: %v", err)
	}
	_ = os.Remove(socket)
}
