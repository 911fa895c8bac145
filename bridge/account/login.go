package account

import (
	"strings"

	"github.com/emersion/go-sasl"
)

// LoginServer is the server side of the non-standard but ubiquitous SASL
// LOGIN mechanism (draft-murchison-sasl-login): the user name and the
// password, each as its own base64 line. go-sasl ships only the client.
// .NET's SmtpClient sends the user name on the AUTH line ("AUTH login
// <base64>"); others wait for the "Username:" prompt. Prompt texts vary by
// implementation, so the client's answers are taken in order, whatever
// prompts it was shown.
type LoginServer struct {
	authenticate func(username, password string) error
	username     []byte
	step         int
}

// NewLoginServer returns a LOGIN server that calls authenticate with the
// user name and password the client sent.
func NewLoginServer(authenticate func(username, password string) error) sasl.Server {
	return &LoginServer{authenticate: authenticate}
}

// Next implements sasl.Server.
func (s *LoginServer) Next(response []byte) (challenge []byte, done bool, err error) {
	switch s.step {
	case 0:
		s.step = 1
		if response == nil {
			return []byte("Username:"), false, nil
		}
		fallthrough
	case 1:
		s.username = response
		s.step = 2
		return []byte("Password:"), false, nil
	case 2:
		s.step = 3
		return nil, true, s.authenticate(string(s.username), string(response))
	}
	return nil, true, sasl.ErrUnexpectedClientResponse
}

// compile-time check: LoginServer is a SASL server.
var _ sasl.Server = (*LoginServer)(nil)

// NewSASLServer returns the server of mechanism mech (PLAIN or LOGIN, any
// case) that calls authenticate with the user name and password the client
// sent, nil for another mechanism. A PLAIN authorization identity other
// than the user name is a failed login, as an empty user name would be.
// The SMTP, POP3 and IMAP sides all log in through it.
func NewSASLServer(mech string, authenticate func(username, password string) error) sasl.Server {
	switch strings.ToUpper(mech) {
	case sasl.Plain:
		return sasl.NewPlainServer(func(identity, username, password string) error {
			if identity != "" && identity != username {
				return authenticate("", "")
			}
			return authenticate(username, password)
		})
	case sasl.Login:
		return NewLoginServer(authenticate)
	}
	return nil
}
